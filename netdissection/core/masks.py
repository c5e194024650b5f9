"""Counting mask pixels against labels without a gather per pixel: the IoU pass's inner loop.

Two ideas keep the work per active pixel to a comparison and one counted key:

* **Label sets.** The labels of one pixel (its label layers, after the semantics' deduplication) form a
  small set, and an image has few distinct sets (Broden: a few dozen). ``label_sets`` numbers the distinct
  sets of a batch once (each set belongs to one image), so a pixel carries one set id instead of K label
  numbers. Counting a unit's mask pixels per set, then spreading each (unit, set) count over the set's
  labels, gives the intersections, and the per (unit, image) mask areas come out of the same counts.
* **Cells.** Bilinear upsampling gives every output pixel a convex combination of the four corners of its
  source cell (see ``upsample``), so only cells with a corner above the threshold can hold mask pixels. The
  set ids of each cell's output pixels are laid out as one contiguous block per cell (``cell_blocks``), so
  an active cell reads its block in one row gather, and its pixels are evaluated exactly in float64 with
  the arithmetic of the brute-force definition: ``top = c00·(1−wx) + c01·wx`` (``bottom`` likewise), then
  ``top·(1−wy) + bottom·wy``.

The comparisons that only select candidates (a pair's peak, a cell's corners) run in float32 against the
largest float32 not above the float64 threshold, which for float32 values decides ``x > t`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .upsample import source_positions

#: Bounds the temporaries of one step whatever the layer and batch: corner maps of at most this many cells,
#: float64 values of at most this many pixels.
CHUNK_VALUES = 1 << 21


@dataclass
class LabelSets:
    """The distinct label sets of a batch: ``ids`` ``(N, sh, sw)`` int32 the set of each pixel; ``labels``
    ``(M, K)`` the label numbers of each set (0: none); ``image`` ``(M,)`` the image each set belongs to."""

    ids: torch.Tensor
    labels: torch.Tensor
    image: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LabelSets:
        return LabelSets(*(t.to(device, non_blocking=non_blocking) for t in (self.ids, self.labels, self.image)))

    def rows(self, keep: torch.Tensor) -> LabelSets:
        """The sets of the images ``keep`` ``(N,)`` bool selects, numbered in the same order (a set belongs to
        one image): what ``label_sets`` gives for those images' labels."""
        keep = keep.to(self.image.device)
        kept = keep.index_select(0, self.image)  # (M,) the sets of kept images
        number = torch.cumsum(kept, 0) - 1  # a kept set's new id
        position = torch.cumsum(keep, 0) - 1  # a kept image's new index
        ids = number.index_select(0, self.ids[keep].reshape(-1).long()).view(-1, *self.ids.shape[1:])
        return LabelSets(ids.to(self.ids.dtype), self.labels[kept], position.index_select(0, self.image[kept]))


#: The most keys ``label_sets`` numbers with a dense table (a bool and an int64 each) before it sorts instead.
DENSE_KEYS = 1 << 23


def label_sets(flat: torch.Tensor, shape: tuple[int, int], size: int) -> LabelSets:
    """Number the distinct label sets of ``flat`` ``(N, K, S)`` (label numbers below ``size``, per pixel), in
    the order of (image, first label, second label, ...)."""
    n, k, s = flat.shape
    device = flat.device
    image = torch.arange(n, device=device).repeat_interleave(s)
    # Each layer's label numbers in (image, pixel) order, the order of the set ids below.
    layer = [flat[:, j].reshape(-1) for j in range(k)]
    # The label numbers present, ranked: a small alphabet to build keys from.
    present = torch.bincount(flat.reshape(-1), minlength=size)[:size] > 0
    rank = torch.cumsum(present, 0) - 1
    letters = int(rank[-1]) + 1
    # Fold the layers in one at a time: the key of (set so far, next label) numbered densely when the key
    # space is small (the usual case: a few hundred sets, tens of labels), else by sorting.
    ids, count = image, n
    for j in range(k):
        key = ids * letters + rank.index_select(0, layer[j])
        space = count * letters
        if space <= DENSE_KEYS:
            seen = torch.zeros(space, dtype=torch.int64, device=device)
            seen.scatter_(0, key, 1)
            number = torch.cumsum(seen, 0) - 1
            ids, count = number.index_select(0, key), int(number[-1]) + 1
        else:
            _, ids = torch.unique(key, return_inverse=True)
            count = int(ids.max()) + 1
    # Every pixel of a set writes the same labels: any one write is the set's.
    labels = torch.zeros(k, count, dtype=flat.dtype, device=device)
    for j in range(k):
        labels[j].index_copy_(0, ids, layer[j])
    labels = labels.T.contiguous()
    owner = torch.zeros(count, dtype=torch.int64, device=device)
    owner.scatter_(0, ids, image)
    # The ids in int32 (a batch has far fewer than 2^31 pixels): half the bytes a worker sends and the cell
    # blocks copy.
    return LabelSets(ids.view(n, *shape).to(torch.int32), labels, owner)


def floor_float32(t: torch.Tensor) -> torch.Tensor:
    """The largest float32 not above each float64 ``t``: for a float32 ``x``, ``x > t`` ⇔ ``x > floor(t)``."""
    nearest = t.float()
    below = torch.nextafter(nearest, torch.full_like(nearest, -torch.inf))
    return torch.where(nearest.double() > t, below, nearest)


@dataclass(frozen=True)
class AxisCells:
    """One axis of the upsampling (in → out), its output positions grouped into cells: runs of positions
    that interpolate between the same two source indices. A clamped edge (weight 0) is a cell of its own,
    between a source index and itself, so that no cell is wider than the scale."""

    lower: torch.Tensor  # (cells,) source index of each cell's lower corner
    upper: torch.Tensor  # (cells,) ... and of its upper corner (the same index at a clamped edge)
    positions: torch.Tensor  # (cells, width) output positions of each cell, padded with -1
    weight_lower: torch.Tensor  # (cells, width) float64 weight of the lower corner; NaN at padding
    weight_upper: torch.Tensor  # (cells, width) ... of the upper corner

    @classmethod
    def of(cls, size_in: int, size_out: int) -> AxisCells:
        lower, upper, weight = source_positions(size_in, size_out)
        upper = torch.where(weight > 0, upper, lower)
        pair = lower * size_in + upper  # non-decreasing along the axis
        starts = torch.cat([torch.tensor([0]), torch.nonzero(pair[1:] != pair[:-1]).flatten() + 1])
        lengths = torch.diff(torch.cat([starts, torch.tensor([size_out])]))
        width = int(lengths.max())
        offsets = torch.arange(width)
        positions = starts.unsqueeze(1) + offsets
        valid = offsets < lengths.unsqueeze(1)
        positions = torch.where(valid, positions, -1)
        upper_weight = torch.where(valid, weight[positions.clamp(min=0)], torch.nan)
        # NaN weights at padded positions make their values NaN, and NaN > threshold is False: padding
        # never hits, with no separate validity mask to compute.
        return cls(lower[starts], upper[starts], positions, 1 - upper_weight, upper_weight)

    def identity(self, size_in: int) -> bool:
        """One cell per source index, of one output position (the output is the input's size): the
        upsampling copies the map, and a cell's four corners are its one value."""
        return bool(self.lower.numel() == size_in and self.positions.shape[1] == 1
                    and torch.equal(self.lower, torch.arange(size_in)) and torch.equal(self.upper, self.lower))

    def shifted(self, size_in: int) -> bool:
        """The cells are (0, 0), (0, 1), (1, 2), …, (h−1, h−1): every source index and the next, with both
        edges clamped (always so when upsampling to a size that is no odd multiple)."""
        every = torch.arange(size_in + 1)
        return bool(self.lower.numel() == size_in + 1 and torch.equal(self.lower, (every - 1).clamp(min=0))
                    and torch.equal(self.upper, every.clamp(max=size_in - 1)))


def cell_blocks(ids: torch.Tensor, rows: AxisCells, cols: AxisCells, padding: int) -> torch.Tensor:
    """``(N·cells_y·cells_x, R·C)``: per image and cell, the set ids of the cell's output pixels
    (``padding`` where a cell has fewer than R × C: never read, as no padded pixel is above a threshold)."""
    n, sh, sw = ids.shape
    device = ids.device
    padded = torch.full((n, sh + 1, sw + 1), padding, dtype=ids.dtype, device=device)
    padded[:, :sh, :sw] = ids
    # Position -1 (a cell's padding) reads the padded last row or column.
    ys = torch.where(rows.positions >= 0, rows.positions, sh).to(device)
    xs = torch.where(cols.positions >= 0, cols.positions, sw).to(device)
    flat = (ys[:, None, :, None] * (sw + 1) + xs[None, :, None, :])  # (cy, cx, R, C)
    blocks = padded.view(n, -1)[:, flat.reshape(-1)]
    return blocks.view(n * flat.shape[0] * flat.shape[1], flat.shape[2] * flat.shape[3])


@dataclass(frozen=True)
class CellPlan:
    """The upsampling of h × w maps to sh × sw pixels, by cell, on one device."""

    map_shape: tuple[int, int]
    rows: AxisCells
    cols: AxisCells
    row_lower: torch.Tensor  # (cy,) on the device
    row_upper: torch.Tensor
    col_lower: torch.Tensor
    col_upper: torch.Tensor
    wy: torch.Tensor  # (cy, R) float64 weight of the lower corner; NaN at padding
    wy_upper: torch.Tensor  # (cy, R) ... of the upper corner
    wx: torch.Tensor  # (cx, C)
    wx_upper: torch.Tensor
    #: The cells are every source index and the next (``AxisCells.shifted``) on both axes: the corners of
    #: all cells are the map and its shifted copies.
    shifted: bool
    #: The labels have the map's size (``AxisCells.identity`` on both axes; an early layer such as resnet18's
    #: ``conv1`` on Broden): each cell is one value of the map.
    identity: bool = False

    @classmethod
    def of(cls, map_shape: tuple[int, int], label_shape: tuple[int, int], device: torch.device | str) -> CellPlan:
        rows, cols = AxisCells.of(map_shape[0], label_shape[0]), AxisCells.of(map_shape[1], label_shape[1])
        shifted = rows.shifted(map_shape[0]) and cols.shifted(map_shape[1])
        identity = rows.identity(map_shape[0]) and cols.identity(map_shape[1])
        return cls(tuple(map_shape), rows, cols, rows.lower.to(device), rows.upper.to(device),  # type: ignore[arg-type]
                   cols.lower.to(device), cols.upper.to(device), rows.weight_lower.to(device),
                   rows.weight_upper.to(device), cols.weight_lower.to(device), cols.weight_upper.to(device), shifted,
                   identity)

    @property
    def cells(self) -> tuple[int, int]:
        return int(self.row_lower.shape[0]), int(self.col_lower.shape[0])

    @property
    def cell_pixels(self) -> int:
        return int(self.wy.shape[1] * self.wx.shape[1])

    def corner_max(self, maps: torch.Tensor) -> torch.Tensor:
        """``(P, cy, cx)``: the largest of each cell's four corners, for maps ``(P, h, w)``."""
        if self.identity:
            return maps  # each cell's corners are its one value (seven gathers and maxima saved per map)
        if self.shifted:
            # Cell r spans source indices r − 1 and r, clamped: the maximum of each row and the next, with
            # the first and last rows on their own, then the same over columns. (Two elementwise maxima:
            # several times faster than a 2 × 2 max pooling of the map with its edges repeated, on the CPU.)
            return _neighbour_max(_neighbour_max(maps, 1), 2)
        top = maps.index_select(1, self.row_lower)
        bottom = maps.index_select(1, self.row_upper)
        return torch.maximum(
            torch.maximum(top.index_select(2, self.col_lower), top.index_select(2, self.col_upper)),
            torch.maximum(bottom.index_select(2, self.col_lower), bottom.index_select(2, self.col_upper)))

    def above(self, maps: torch.Tensor, pair: torch.Tensor, ci: torch.Tensor, cj: torch.Tensor,
              thresholds: torch.Tensor) -> torch.Tensor:
        """``(cells, R·C)``: which pixels of the cells (``pair``, ``ci``, ``cj``) of ``maps`` ``(P, h, w)``
        are strictly above ``thresholds`` ``(cells,)`` float64 once upsampled (False at padding)."""
        _p, h, w = maps.shape
        flat = maps.reshape(-1)
        base = pair * (h * w)
        rows = (self.row_lower.index_select(0, ci) * w, self.row_upper.index_select(0, ci) * w)
        cols = (self.col_lower.index_select(0, cj), self.col_upper.index_select(0, cj))

        def corner(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return flat.index_select(0, base + y + x).double().view(-1, 1, 1)

        wx, wx1 = self.wx.index_select(0, cj).unsqueeze(1), self.wx_upper.index_select(0, cj).unsqueeze(1)
        top = corner(rows[0], cols[0]) * wx + corner(rows[0], cols[1]) * wx1  # (cells, 1, C)
        bottom = corner(rows[1], cols[0]) * wx + corner(rows[1], cols[1]) * wx1
        values = top * self.wy.index_select(0, ci).unsqueeze(2)  # (cells, R, C)
        values += bottom * self.wy_upper.index_select(0, ci).unsqueeze(2)
        # NaN weights at padding make NaN values, never above a threshold.
        return (values > thresholds.view(-1, 1, 1)).view(values.shape[0], -1)


def _neighbour_max(maps: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim`` (of size n): the first entry, the maximum of each entry and the next, the last entry (n + 1)."""
    n = maps.shape[dim]
    shape = list(maps.shape)
    shape[dim] = n + 1
    out = maps.new_empty(shape)
    out.narrow(dim, 0, 1).copy_(maps.narrow(dim, 0, 1))
    torch.maximum(maps.narrow(dim, 0, n - 1), maps.narrow(dim, 1, n - 1), out=out.narrow(dim, 1, n - 1))
    out.narrow(dim, n, 1).copy_(maps.narrow(dim, n - 1, 1))
    return out


def count_sets(maps: torch.Tensor, image_idx: torch.Tensor, unit_idx: torch.Tensor, thresholds: torch.Tensor,
               plan: CellPlan, blocks: torch.Tensor, sets: int, units: int) -> torch.Tensor:
    """``(units, sets)``: per unit and label set, the mask pixels of the (image, unit) ``pairs`` of ``maps``
    ``(P, h, w)`` float32 that carry the set. ``thresholds`` ``(P,)`` float64 per pair; ``blocks`` from
    ``cell_blocks``."""
    device = maps.device
    cy, cx = plan.cells
    width = plan.cell_pixels
    counts = torch.zeros(units * sets, dtype=torch.int64, device=device)
    limit = floor_float32(thresholds)
    step = max(1, CHUNK_VALUES // (cy * cx))
    for start in range(0, maps.shape[0], step):
        chunk = maps[start:start + step]
        hot = plan.corner_max(chunk) > limit[start:start + step].view(-1, 1, 1)
        pair, ci, cj = torch.nonzero(hot, as_tuple=True)
        pair += start
        cell_step = max(1, CHUNK_VALUES // width)
        for first in range(0, pair.numel(), cell_step):
            p, i, j = (t[first:first + cell_step] for t in (pair, ci, cj))
            cell, within = torch.nonzero(plan.above(maps, p, i, j, thresholds.index_select(0, p)), as_tuple=True)
            if cell.numel() == 0:
                continue
            # Each hit pixel's label set, read from its cell's block; counted per (unit, set).
            row = (image_idx.index_select(0, p) * cy + i) * cx + j
            member = blocks.view(-1).index_select(0, row.index_select(0, cell) * width + within)
            keys = unit_idx.index_select(0, p).index_select(0, cell) * sets + member
            counts.scatter_add_(0, keys, _ones(keys.numel(), device))
    return counts.view(units, sets)


_ONES: dict[torch.device, torch.Tensor] = {}


def _ones(count: int, device: torch.device) -> torch.Tensor:
    """``count`` int64 ones (a view of a buffer kept per device): what ``scatter_add_`` counts with, much
    faster than ``bincount`` on the CPU."""
    ones = _ONES.get(device)
    if ones is None or ones.numel() < count:
        ones = _ONES[device] = torch.ones(max(count, 1 << 16), dtype=torch.int64, device=device)
    return ones[:count]
