"""Explainers: labelling units with more than one concept (``--explain NAME``)."""
