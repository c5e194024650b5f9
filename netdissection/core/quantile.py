"""Exact quantiles from a running top-k, with numpy's own interpolation arithmetic.

Only the largest values of a unit decide its (1 − q) quantile: with n values, numpy's "linear"
method reads the sorted values at ⌊(n − 1)(1 − q)⌋ and the one after it, so keeping the top
n − ⌊(n − 1)(1 − q)⌋ values per unit (≈ q·n + 1) is enough to get the exact answer in bounded memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def virtual_index(n: int, level: float, method: str) -> float:
    """numpy.quantile's virtual index for ``n`` values at ``level`` (0-based, ascending order)."""
    if method == "linear":
        return (n - 1) * level
    if method == "hazen":  # Hyndman & Fan type 5: alpha = beta = 1/2
        return n * level + (0.5 + level * (1 - 0.5 - 0.5)) - 1
    raise ValueError(f"unsupported quantile method {method!r}; use 'linear' or 'hazen'")


def values_needed(n: int, level: float, method: str) -> int:
    """How many of the largest values decide the quantile of ``n`` values."""
    lowest = min(max(math.floor(virtual_index(n, level, method)), 0), n - 1)
    return n - lowest


def quantile_from_top(top_ascending: np.ndarray, n: int, level: float, method: str) -> np.ndarray:
    """The quantile of ``n`` values per row, given each row's largest values sorted ascending.

    ``top_ascending`` is ``(rows, k)`` float64 holding the k largest of the n values (k ≥ the number
    ``values_needed`` reports). Uses numpy's lerp, including its rounding-symmetric form for
    weights ≥ 0.5, so the result is bit-identical to ``numpy.quantile``.
    """
    _rows, k = top_ascending.shape
    if k < values_needed(n, level, method):
        raise ValueError(f"{k} top values cannot give the quantile of {n} values")
    v = virtual_index(n, level, method)
    previous = math.floor(v)
    if v >= n - 1:
        previous = following = n - 1
    elif v < 0:
        previous = following = 0
    else:
        following = previous + 1
    gamma = v - math.floor(v)
    offset = n - k  # ascending index i of all values is column i - offset of the top values
    a = top_ascending[:, previous - offset]
    b = top_ascending[:, following - offset]
    diff = b - a
    result = a + diff * gamma
    if gamma >= 0.5:
        result = b - diff * (1 - gamma)
    return result.astype(np.float64)


class StreamingTopK:
    """Keeps the k largest values of each unit over a stream of activation batches."""

    def __init__(self, units: int, k: int, device: torch.device | str = "cpu") -> None:
        self.units, self.k = units, k
        self.values = torch.empty(units, 0, device=device)
        self.count = 0

    def update(self, activations: torch.Tensor) -> None:
        """Take ``(N, units, h, w)`` activations (any spatial size)."""
        _n, units = activations.shape[:2]
        if units != self.units:
            raise ValueError(f"expected {self.units} units, got {units}")
        flat = activations.detach().transpose(0, 1).reshape(units, -1).float()
        self.count += flat.shape[1]
        merged = torch.cat([self.values.to(flat.device), flat], dim=1)
        if merged.shape[1] > self.k:
            merged = torch.topk(merged, self.k, dim=1, largest=True, sorted=False).values
        self.values = merged

    def ascending(self) -> np.ndarray:
        """The kept values, float64, sorted ascending per unit."""
        return np.sort(self.values.double().cpu().numpy(), axis=1)
