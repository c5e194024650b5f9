"""The ``fixed`` threshold rule: every unit's threshold is the same absolute activation value.

Useful when units are compared across runs on one scale (a calibrated model, a sparse code) rather than
each at its own top quantile. It needs no pass over the data, so it is trivially streaming and mergeable.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class FixedThreshold:
    """``factory(units, values_per_unit, *, value)``: ``--threshold fixed --threshold-param value=0.5``."""

    def __init__(self, units: int, values_per_unit: int, *, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"value must be a finite number, not {value}")
        self.units, self.value = units, value
        self.seen = 0  # values per unit so far (kept for the merge check; the threshold never needs them)

    def update(self, activations: torch.Tensor) -> None:
        n, units, h, w = activations.shape
        if units != self.units:
            raise ValueError(f"the rule was made for {self.units} units, not {units}")
        self.seen += n * h * w

    def merge(self, other: FixedThreshold) -> FixedThreshold:
        """Combine with the rule of another shard of the same layer."""
        if other.value != self.value or other.units != self.units:
            raise ValueError("only rules with the same value and units merge")
        self.seen += other.seen
        return self

    def finish(self) -> np.ndarray:
        return np.full(self.units, self.value, dtype=np.float64)
