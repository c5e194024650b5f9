"""Which pixels of a bilinearly upsampled map exceed a threshold, without upsampling the whole map.

Bilinear upsampling (half-pixel centres, clamped edges: ``F.interpolate(mode="bilinear",
align_corners=False)``) gives each output pixel a convex combination of the four source values of
its cell, so no pixel of a cell can exceed the threshold unless one of the cell's corners does.
The few cells with a corner above the threshold are evaluated exactly, in float64; the rest are
skipped. The result equals thresholding the full float64 upsampling (up to rounding in the last
bit of interior pixels; clamped edge pixels are exactly their edge value).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class AxisPlan:
    """For one axis (in → out): each output position's source index pair and weight, grouped by cell."""

    lower: torch.Tensor  # (cells,) source index of each cell's lower corner
    upper: torch.Tensor  # (cells,) ... and its upper corner (clamped at the edge)
    positions: torch.Tensor  # (cells, width) output positions of each cell, padded with -1
    weights: torch.Tensor  # (cells, width) float64 weight of the upper corner; NaN at padding


@lru_cache(maxsize=64)
def source_positions(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's ``area_pixel_compute_source_index`` for align_corners=False: per output position, the source
    index of its lower and upper corner and the float64 weight of the upper one."""
    scale = size_in / size_out
    out = torch.arange(size_out, dtype=torch.float64)
    src = ((out + 0.5) * scale - 0.5).clamp(min=0)
    lower = src.floor().long().clamp(max=size_in - 1)
    upper = torch.where(lower < size_in - 1, lower + 1, lower)
    # Where the edge is clamped both corners are the same source value: give it weight 0 so the
    # pixel equals that value exactly, as bilinear interpolation defines it (c·(1−w) + c·w may be
    # off by one ulp, which matters when a threshold is itself a source value).
    weight = torch.where(upper == lower, 0.0, src - lower.double())
    return lower, upper, weight


@lru_cache(maxsize=64)
def axis_plan(size_in: int, size_out: int) -> AxisPlan:
    """``source_positions`` grouped by source cell (the lower corner)."""
    lower, upper, weight = source_positions(size_in, size_out)
    cells = torch.unique(lower)
    width = int(torch.bincount(lower).max())
    positions = torch.full((len(cells), width), -1, dtype=torch.long)
    # NaN weights at padded positions make their values NaN, and NaN > threshold is False: padding
    # never hits, with no separate validity mask to compute.
    weights = torch.full((len(cells), width), torch.nan, dtype=torch.float64)
    for row, cell in enumerate(cells.tolist()):
        members = torch.nonzero(lower == cell).flatten()
        positions[row, : len(members)] = members
        weights[row, : len(members)] = weight[members]
    return AxisPlan(cells, upper[torch.searchsorted(lower, cells)], positions, weights)


def active_pixels(maps: torch.Tensor, thresholds: torch.Tensor, out_h: int, out_w: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For maps ``(P, h, w)`` and per-map thresholds ``(P,)`` float64: the (map, flat pixel) index pairs
    where the bilinear upsampling to ``out_h × out_w`` is strictly above the threshold."""
    device = maps.device
    rows, cols = axis_plan(maps.shape[1], out_h), axis_plan(maps.shape[2], out_w)
    ry0, ry1 = rows.lower.to(device), rows.upper.to(device)
    cx0, cx1 = cols.lower.to(device), cols.upper.to(device)
    a = maps.double()
    # The four corners of every cell: (P, row cells, col cells).
    c00 = a[:, ry0][:, :, cx0]
    c01 = a[:, ry0][:, :, cx1]
    c10 = a[:, ry1][:, :, cx0]
    c11 = a[:, ry1][:, :, cx1]
    corner_max = torch.maximum(torch.maximum(c00, c01), torch.maximum(c10, c11))
    pair, ci, cj = torch.nonzero(corner_max > thresholds.view(-1, 1, 1), as_tuple=True)
    if pair.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty

    wy = rows.weights.to(device)[ci][:, :, None]  # (cells, R, 1)
    wx = cols.weights.to(device)[cj][:, None, :]  # (cells, 1, C)
    corners = [c[pair, ci, cj].view(-1, 1, 1) for c in (c00, c01, c10, c11)]
    top = corners[0] * (1 - wx) + corners[1] * wx  # (cells, 1, C): interpolate along x first
    bottom = corners[2] * (1 - wx) + corners[3] * wx
    values = torch.addcmul(top, bottom - top, wy)  # then along y, in one pass over (cells, R, C)
    hit = values > thresholds[pair].view(-1, 1, 1)
    cell, r, c = torch.nonzero(hit, as_tuple=True)
    ys = rows.positions.to(device)[ci[cell], r]
    xs = cols.positions.to(device)[cj[cell], c]
    return pair[cell], ys * out_w + xs
