"""Threshold rules: how each unit's activation threshold is set (the paper's exact quantile)."""
