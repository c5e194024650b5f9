"""Degenerate layers: maps that cannot localise anything, thresholds stuck at the floor, masks that never fire.

A dissection of such a layer runs to the end and reports numbers that mean little (0 detectors, or
detectors of whatever covers the most pixels). ``UnitStatistics`` collects what it takes to tell, per unit,
while the activation pass streams the maps by; ``layer_warnings`` turns it into one sentence per problem.

``UnitStatistics`` is a mergeable accumulator, like the threshold rules: shards of a dataset may each keep
their own, and ``merge`` combines them into what one pass over all images would have collected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: A map counts as spatially constant when its range is at most this fraction of its magnitude: float
#: sums of the same broadcast value may differ in the last bits, real spatial structure is far above it.
CONSTANT_TOLERANCE = 1e-5

#: Warn when at least this fraction of the units have spatially constant maps ...
CONSTANT_UNITS_FRACTION = 0.5
#: ... or a threshold equal to their minimum activation (units at their floor on ≥ 1 − q of positions).
FLOOR_UNITS_FRACTION = 0.25


@dataclass(frozen=True)
class LayerStatistics:
    """What the activation pass saw of one layer, per unit: range, and whether any map varied in space."""

    minimum: np.ndarray  # (U,) float64
    maximum: np.ndarray  # (U,) float64
    varies: np.ndarray  # (U,) bool: some image gave the unit a map that is not spatially constant
    map_shape: tuple[int, int, int]  # (units, h, w)
    images: int


class UnitStatistics:
    """Streaming per-unit statistics of raw ``(N, units, h, w)`` maps: ``update`` per batch, ``merge`` across
    shards, ``result`` at the end."""

    def __init__(self) -> None:
        self.minimum: torch.Tensor | None = None
        self.maximum: torch.Tensor | None = None
        self.varies: torch.Tensor | None = None
        self.map_shape: tuple[int, int, int] | None = None
        self.images = 0

    def update(self, acts: torch.Tensor) -> None:
        low, high = torch.aminmax(acts.detach().flatten(2), dim=2)  # per image and unit: one pass, exact
        low, high = low.double(), high.double()
        varies = ((high - low) > CONSTANT_TOLERANCE * torch.maximum(high.abs(), low.abs())).any(dim=0).cpu()
        low, high = low.amin(dim=0).cpu(), high.amax(dim=0).cpu()
        shape = (int(acts.shape[1]), int(acts.shape[2]), int(acts.shape[3]))
        self._combine(low, high, varies, shape, int(acts.shape[0]))

    def merge(self, other: UnitStatistics) -> UnitStatistics:
        """Fold another shard's statistics of the same layer into this one; returns self."""
        if other.map_shape is not None:
            assert other.minimum is not None and other.maximum is not None and other.varies is not None
            self._combine(other.minimum, other.maximum, other.varies, other.map_shape, other.images)
        return self

    def _combine(self, low: torch.Tensor, high: torch.Tensor, varies: torch.Tensor, shape: tuple[int, int, int],
                 images: int) -> None:
        if self.map_shape is None:
            self.minimum, self.maximum, self.varies, self.map_shape = low, high, varies, shape
        else:
            assert self.minimum is not None and self.maximum is not None and self.varies is not None
            if shape[0] != self.map_shape[0]:
                raise ValueError(f"statistics of {shape[0]} units cannot merge with {self.map_shape[0]}")
            self.minimum = torch.minimum(self.minimum, low)
            self.maximum = torch.maximum(self.maximum, high)
            self.varies = self.varies | varies
        self.images += images

    def result(self) -> LayerStatistics:
        if self.map_shape is None:
            raise ValueError("no activations were seen")
        assert self.minimum is not None and self.maximum is not None and self.varies is not None
        return LayerStatistics(self.minimum.numpy().copy(), self.maximum.numpy().copy(), self.varies.numpy().copy(),
                               self.map_shape, self.images)


def layer_warnings(stats: LayerStatistics, thresholds: np.ndarray, activation: np.ndarray) -> list[str]:
    """One sentence per way the layer is degenerate, from its statistics, its thresholds (U,) and the IoU
    pass's mask areas ``activation`` (U, C); empty for a layer that is fine."""
    units = int(thresholds.shape[0])
    warnings = []
    # A unit at one value everywhere in every image is dead rather than constant in space: the floor
    # warning below names it.
    constant = int((~stats.varies & (stats.maximum > stats.minimum)).sum())
    if constant and constant >= CONSTANT_UNITS_FRACTION * units:
        _, h, w = stats.map_shape
        warnings.append(f"spatially constant maps: {constant} of {units} units give one value at all {h}×{w} "
                        "positions of each image (a value that changes only from image to image), so their masks "
                        "cannot localise a concept")
    floor = int((thresholds <= stats.minimum).sum())
    if floor and floor >= FLOOR_UNITS_FRACTION * units:
        warnings.append(f"thresholds at the minimum: {floor} of {units} units have a threshold equal to their "
                        "lowest activation (they sit at their floor almost everywhere), so their masks are "
                        "whatever rises above it")
    if not np.asarray(activation).any():
        warnings.append("no masks: no unit's mask covers a single pixel of any image, so the layer detects nothing")
    return warnings
