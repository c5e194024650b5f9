"""The IoU pass: intersection and activation counts, batched arithmetic on torch tensors (CPU or CUDA).

Two facts make it fast and still exact:

* Bilinear upsampling is a convex combination of source values, so a unit whose raw map never
  exceeds its threshold in an image has an empty mask there, and within a map only the cells with
  a corner above the threshold can hold mask pixels (see ``upsample``). Only those cells are
  evaluated — usually a small fraction of the (image, unit, pixel) space.
* Intersections are counted with one ``bincount`` over (unit, label set) keys of the mask pixels
  (``masks``: a pixel's labels are one of its image's few distinct label sets), then spread over
  each set's labels, instead of comparing masks with every concept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .masks import CellPlan, LabelSets, cell_blocks, count_sets, floor_float32, label_sets
from .partials import CountsPartial, LayerCounts
from .types import Vocabulary

log = logging.getLogger(__name__)

#: Semantics of the counts: "paper" (the protocol) or "lite" (NetDissect-Lite's numbers).
SEMANTICS = ("paper", "lite")

#: (image, unit) pairs processed at once where a pass visits each pair's mask pixels (the explainers').
PAIR_CHUNK = 4096


@dataclass
class LabelBatch:
    """The labels of a batch of images, prepared once and shared by every layer.

    ``layers`` ``(N, K, S)`` label numbers per flattened pixel (paper semantics: a label repeated at
    the same pixel in another layer is zeroed so it counts once); ``image_labels`` ``(N, J)``
    image-level labels padded with 0; ``has_category`` ``(N, C)`` which categories each image has;
    ``truth`` ``(N, L)`` each image's truth counts G (their sum over the batch is the batch's G);
    ``sets`` the batch's distinct label sets (``masks.label_sets``; made when first needed). ``layers`` is
    None in a batch prepared for a counting that reads only the label sets (``LabelPreparation``).
    """

    layers: torch.Tensor | None
    image_labels: torch.Tensor
    has_category: torch.Tensor
    shape: tuple[int, int]
    truth: torch.Tensor | None = None
    sets: LabelSets | None = None
    _blocks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def label_sets(self, size: int) -> LabelSets:
        """The distinct label sets of the batch (label numbers below ``size``)."""
        if self.sets is None:
            if self.layers is None:
                raise ValueError("a batch prepared without its label layers has its label sets already")
            self.sets = label_sets(self.layers, self.shape, size)
        return self.sets

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LabelBatch:
        """The batch on ``device`` (its label sets too, when made)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return LabelBatch(move(self.layers) if self.layers is not None else None, move(self.image_labels),
                          move(self.has_category), self.shape,
                          truth=move(self.truth) if self.truth is not None else None,
                          sets=self.sets.to(device, non_blocking) if self.sets is not None else None)

    def pin_memory(self) -> LabelBatch:
        sets = self.sets
        if sets is not None:
            sets = LabelSets(sets.ids.pin_memory(), sets.labels.pin_memory(), sets.image.pin_memory())
        return LabelBatch(self.layers.pin_memory() if self.layers is not None else None,
                          self.image_labels.pin_memory(), self.has_category.pin_memory(), self.shape,
                          truth=self.truth.pin_memory() if self.truth is not None else None, sets=sets)

    def rows(self, keep: torch.Tensor) -> tuple[LabelBatch, torch.Tensor]:
        """The labels of the images ``keep`` ``(N,)`` bool selects, and their truth counts G (their label sets
        are made again when needed, or, in a batch without its label layers, are those of the kept images)."""
        assert self.truth is not None
        truth = self.truth[keep]
        sets = None
        if self.layers is None:
            assert self.sets is not None
            sets = self.sets.rows(keep)
        return (LabelBatch(self.layers[keep] if self.layers is not None else None, self.image_labels[keep],
                           self.has_category[keep], self.shape, truth=truth, sets=sets), truth.sum(dim=0))

    def cell_blocks(self, plan: CellPlan) -> torch.Tensor:
        """The set ids of every pixel, one block per source cell of ``plan`` (shared by layers of one size)."""
        assert self.sets is not None
        if plan.map_shape not in self._blocks:
            self._blocks[plan.map_shape] = cell_blocks(self.sets.ids, plan.rows, plan.cols, 0)
        return self._blocks[plan.map_shape]


def prepare_labels(layers: torch.Tensor, image_labels: torch.Tensor, category_of: torch.Tensor,
                   categories: int, semantics: str) -> tuple[LabelBatch, torch.Tensor]:
    """Prepare a batch's labels; return them and the batch's truth counts G (per label number).

    ``layers`` ``(N, K, sh, sw)`` integer label numbers, ``image_labels`` ``(N, J)`` integers (0 = padding),
    ``category_of`` ``(L,)`` the primary category index of each label number (-1 = not a concept).
    """
    n, k, sh, sw = layers.shape
    device = layers.device
    size = category_of.shape[0]
    # Label numbers outside the vocabulary (or of unselected categories) count as unlabelled: one lookup
    # in a table that keeps a concept's number and maps anything else to 0 (category_of[0] is -1).
    # The table has one more entry, 0, where clamping puts every number past the vocabulary (and the negative
    # ones go to entry 0, itself 0): one clamp and one lookup per value.
    numbers = torch.arange(size + 1, device=device, dtype=layers.dtype)
    keep = torch.where(torch.cat([category_of, category_of.new_full((1,), -1)]).to(device) >= 0, numbers, 0)
    flat = keep.index_select(0, layers.reshape(-1).clamp(0, size)).view(n, k, sh * sw)
    image_labels = image_labels.to(layers.dtype)
    image_labels = keep.index_select(0, image_labels.reshape(-1).clamp(0, size)).view(image_labels.shape)
    if semantics == "paper":
        # A pixel counts once for a label however many layers give it, and an image-level label
        # already covers every pixel.
        for later in range(1, k):
            for earlier in range(later):
                flat[:, later].masked_fill_(flat[:, later] == flat[:, earlier], 0)
        for later in range(image_labels.shape[1]):
            level = image_labels[:, later]
            for earlier in range(later):
                level.masked_fill_(level == image_labels[:, earlier], 0)
            flat.masked_fill_(flat == level.view(n, 1, 1), 0)

    # Per image, how many pixels carry each label: the truth counts G and which categories it has.
    # Keys (image, label) in the label maps' own integer type where they fit (int32 from the loader): half the
    # bytes of int64, and bincount takes them.
    key_type = flat.dtype if n * size < torch.iinfo(flat.dtype).max else torch.int64
    image_of = torch.arange(n, device=device, dtype=key_type).view(n, 1) * size
    per_image = torch.bincount((flat.reshape(n, -1) + image_of).view(-1), minlength=n * size)
    one = torch.ones(1, dtype=torch.int64, device=device)
    levels = (image_labels.to(torch.int64) + image_of.to(torch.int64)).view(-1)
    per_image.scatter_add_(0, levels, (one * (sh * sw)).expand(levels.numel()))
    per_image = per_image.view(n, size)
    per_image[:, 0] = 0
    truth = per_image.sum(dim=0)

    # has_category[x, c]: any label of primary category c occurs in x (pixel or image level).
    # (A float product: integer matrix products are not on every device; the counts are exact in float32.)
    one_hot = torch.zeros(size, categories + 1, device=device)
    one_hot[torch.arange(size, device=device), torch.where(category_of >= 0, category_of, categories).to(device)] = 1
    has = (per_image > 0).float() @ one_hot > 0
    batch = LabelBatch(flat, image_labels, has[:, :categories], (sh, sw), truth=per_image)
    return batch, truth


@dataclass(frozen=True)
class LabelPreparation:
    """``prepare_labels`` with the run's vocabulary and semantics, label sets included: picklable, so that the
    loader's worker processes prepare each batch's labels beside the main process's counting.

    ``keep_layers``: whether the batch keeps its label layers beside the label sets made from them. A counting
    that reads only the sets (``TallyCounts``: ``needs_label_layers = False``) leaves them out: they are three
    quarters of what crosses from a worker (6.4 of 8.4 MB a batch of 32 Broden-like images at 112 px)."""

    category_of: np.ndarray
    categories: int
    semantics: str
    keep_layers: bool = True

    def __call__(self, layers: torch.Tensor, image_labels: torch.Tensor) -> tuple[LabelBatch, torch.Tensor]:
        batch, truth = prepare_labels(layers, image_labels, torch.from_numpy(self.category_of), self.categories,
                                      self.semantics)
        batch.label_sets(len(self.category_of))
        if not self.keep_layers:
            batch.layers = None
        return batch, truth


class IoUAccumulator:
    """Accumulates I[u, l] and A[u, c] for one layer over batches of raw activations.

    With ``groups`` > 1 it keeps them per group of images (blocks of a bootstrap): each ``add`` says
    which group each image belongs to, and the counts come out ``(groups, U, ·)``. ``dtype``: that of
    the intersection counts (a caller keeping many groups may take int32 where the counts fit).
    """

    def __init__(self, thresholds: torch.Tensor, category_of: torch.Tensor, categories: int,
                 semantics: str = "paper", *, groups: int = 1, dtype: torch.dtype = torch.int64) -> None:
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}")
        self.device = thresholds.device
        self.thresholds = thresholds.double()
        self.limits = floor_float32(self.thresholds)  # float32 maps: x > t exactly when x > limit
        self.units = thresholds.shape[0]
        self.category_of = category_of.to(self.device)
        self.size = category_of.shape[0]
        self.categories = categories
        self.semantics = semantics
        self.groups = groups
        self.intersection = torch.zeros(groups * self.units * self.size, dtype=dtype, device=self.device)
        self.activation = torch.zeros(groups * self.units, categories, dtype=torch.int64, device=self.device)
        self.pairs_seen = 0
        self.pairs_upsampled = 0
        self._plans: dict[tuple[int, int, int, int], CellPlan] = {}

    def add(self, activations: torch.Tensor, labels: LabelBatch, group: torch.Tensor | None = None) -> None:
        """Count one batch: ``activations`` ``(N, U, h, w)`` raw maps of the batch's images; ``group``
        ``(N,)`` the group of each image (with ``groups`` > 1)."""
        n, units, h, w = activations.shape
        acts = activations.detach().to(self.device, torch.float32).contiguous()
        peaks = acts.amax(dim=(2, 3))
        image_idx, unit_idx = torch.nonzero(peaks > self.limits, as_tuple=True)
        self.pairs_seen += n * units
        self.pairs_upsampled += int(image_idx.numel())
        if image_idx.numel() == 0:
            return
        key = (h, w, *labels.shape)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = CellPlan.of((h, w), labels.shape, self.device)
        sets = labels.label_sets(self.size)
        maps = acts.view(n * units, h, w).index_select(0, image_idx * units + unit_idx)
        counts = count_sets(maps, image_idx, unit_idx, self.thresholds.index_select(0, unit_idx), plan,
                            labels.cell_blocks(plan), sets.count, self.units)
        self._spread(counts, sets, labels, n, None if group is None else group.to(self.device))

    def _spread(self, counts: torch.Tensor, sets: LabelSets, labels: LabelBatch, n: int,
                group: torch.Tensor | None) -> None:
        """Add the mask pixels per (unit, label set) ``counts`` to I and A (in each image's group's rows)."""
        found = torch.nonzero(counts.view(-1)).flatten()
        pixels = counts.view(-1).index_select(0, found)
        unit, member = found // sets.count, found % sets.count
        image = sets.image.index_select(0, member)
        # The row each count goes to: its unit, in its image's group when there are groups.
        row = unit if group is None else group.index_select(0, image) * self.units + unit
        for column in sets.labels.index_select(0, member).unbind(1):  # a set's labels; 0 = none
            self.intersection.index_add_(0, row * self.size + column,
                                         (pixels * (column > 0)).to(self.intersection.dtype))
        # Mask area per (unit, image); image-level labels cover every pixel, so each adds the whole area.
        area = torch.zeros(self.units * n, dtype=torch.int64, device=self.device)
        area.index_add_(0, unit * n + image, pixels)
        found = torch.nonzero(area).flatten()
        pair_area = area.index_select(0, found)
        pair_unit, pair_image = found // n, found % n
        pair_row = pair_unit if group is None else group.index_select(0, pair_image) * self.units + pair_unit
        level = labels.image_labels.index_select(0, pair_image)  # (pairs, J)
        for column in level.unbind(1):
            self.intersection.index_add_(0, pair_row * self.size + column,
                                         (pair_area * (column > 0)).to(self.intersection.dtype))

        if self.semantics == "paper":
            has = labels.has_category.index_select(0, pair_image).long()  # (pairs, C)
        else:
            # NetDissect-Lite counts a mask only in images where the category occurs under it.
            sentinel = self.categories
            table = torch.zeros(self.units * n, sentinel + 1, dtype=torch.int64, device=self.device)
            rows = unit * n + image
            for column in sets.labels.index_select(0, member).unbind(1):
                cats = self.category_of[column]
                table[rows, torch.where(cats >= 0, cats, sentinel)] = 1
            level_cats = self.category_of[level]
            level_cats = torch.where((level_cats >= 0) & (level > 0), level_cats, sentinel)
            table[(pair_unit * n + pair_image).unsqueeze(1).expand_as(level_cats), level_cats] = 1
            has = table.index_select(0, pair_unit * n + pair_image)[:, :sentinel]
        self.activation.index_add_(0, pair_row, has * pair_area.unsqueeze(1))

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``I`` ``(U, L)`` and ``A`` ``(U, C)``, int64 on the CPU (with groups: ``(groups, U, L)`` in the
        accumulator's dtype and ``(groups, U, C)``)."""
        if self.groups > 1:
            return (self.intersection.reshape(self.groups, self.units, self.size).cpu(),
                    self.activation.reshape(self.groups, self.units, -1).cpu())
        return self.intersection.reshape(self.units, self.size).cpu(), self.activation.cpu()


class CountsAccumulator(Protocol):
    """What the IoU pass of a shard feeds, batch by batch, and what it returns at the end.

    ``TallyCounts`` (the default) sums over the whole shard. A variant keeping counts per block of
    images (say, for resampling) implements the same three methods, choosing the block by the images'
    dataset ``indices``, and returns a partial with its own ``merge``.
    """

    def add_truth(self, indices: np.ndarray, truth: torch.Tensor) -> None:
        """The truth counts G ``(L,)`` of the batch of images at dataset ``indices``."""
        ...

    def add(self, layer: str, indices: np.ndarray, activations: torch.Tensor, labels: LabelBatch) -> None:
        """One layer's raw maps ``(N, U, h, w)`` of those images, with their prepared labels."""
        ...

    def partial(self) -> CountsPartial:
        ...


class TallyCounts:
    """I, A per layer and G, summed over every image of a shard."""

    #: It counts from each batch's label sets alone (an accumulator without this attribute gets the label
    #: layers too).
    needs_label_layers = False

    def __init__(self, thresholds: Mapping[str, np.ndarray], vocabulary: Vocabulary, semantics: str,
                 device: str | torch.device = "cpu") -> None:
        category_of = torch.from_numpy(vocabulary.primary_category_index())
        categories = len(vocabulary.categories)
        self.layers = {name: IoUAccumulator(torch.from_numpy(np.asarray(t)).to(device), category_of, categories,
                                            semantics) for name, t in thresholds.items()}
        self.truth = torch.zeros(category_of.shape[0], dtype=torch.int64)
        self.images = 0

    def add_truth(self, indices: np.ndarray, truth: torch.Tensor) -> None:
        self.truth += truth.cpu()
        self.images += len(indices)

    def add(self, layer: str, indices: np.ndarray, activations: torch.Tensor, labels: LabelBatch) -> None:
        self.layers[layer].add(activations, labels)

    def partial(self) -> CountsPartial:
        layers = {}
        for name, acc in self.layers.items():
            log.debug("%s: upsampled %d of %d (image, unit) pairs", name, acc.pairs_upsampled, acc.pairs_seen)
            intersection, activation = acc.counts()
            layers[name] = LayerCounts(intersection.numpy(), activation.numpy())
        return CountsPartial(layers, self.truth.numpy().copy(), self.images)
