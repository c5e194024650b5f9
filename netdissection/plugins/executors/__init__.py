"""Executors: how the jobs of ``dissect compare`` run."""
