"""Concept datasets: Broden, custom folders, HuggingFace datasets, the generated default set, and the
``dissect data`` commands."""
