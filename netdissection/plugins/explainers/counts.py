"""One read of the dataset for a formula search: exact counts of formula masks against unit masks and
concepts, accumulated per shard by the IoU pass (``FormulaCounts`` is its accumulator) and merged by addition.

For every *slot* (a unit u and a formula F of its beam) and every concept l it counts

* ``joint[s, l] = |M_u ∩ F ∩ l|`` and ``inter[s] = |M_u ∩ F|``,
* ``area[s, c]`` = the mask area of u over the images in F's domain or having category c,

and for every formula ``overlap[F, l] = |F ∩ l|`` and ``size[F] = |F|``. From these, with the tally's
``I[u, l] = |M_u ∩ l|`` and ``G[l] = |l|``, the IoU of ``F AND l``, ``F OR l`` and ``F AND NOT l`` follows
exactly for every l at once (``compositional.expand``): a search step of the whole beam is one read.

The unit masks are the protocol's (``core.upsample.active_pixels``: only the active pixels are visited);
formula masks are evaluated on the labels of each batch, a bounded number at a time (``MASK_BUDGET``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ...core.iou import PAIR_CHUNK, LabelBatch
from ...core.types import Vocabulary
from ...core.upsample import active_pixels
from .formulas import AND, AND_NOT, OR, Formula, Leaf, leaves

#: Bytes of formula and concept masks a batch holds at once (each is one byte per labelled pixel of the batch).
MASK_BUDGET = 64 << 20


@dataclass(frozen=True)
class FormulaRequest:
    """What one read counts: the distinct formulas, and per layer its slots as two aligned arrays — the unit
    (0-based) and the formula (an index into ``formulas``) of each slot."""

    formulas: tuple[Formula, ...]
    slots: Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class LayerFormulaCounts:
    """One layer's counts per slot: ``joint`` ``(S, L)``, ``inter`` ``(S,)``, ``area`` ``(S, C)``, int64."""

    joint: np.ndarray
    inter: np.ndarray
    area: np.ndarray

    def merge(self, other: LayerFormulaCounts) -> LayerFormulaCounts:
        return LayerFormulaCounts(self.joint + other.joint, self.inter + other.inter, self.area + other.area)


@dataclass
class FormulaPartial:
    """A shard's read: per layer its slot counts; per formula ``overlap`` ``(J, L)`` and ``size`` ``(J,)``."""

    layers: dict[str, LayerFormulaCounts]
    overlap: np.ndarray
    size: np.ndarray
    images: int

    def merge(self, other: FormulaPartial) -> FormulaPartial:
        layers = {name: counts.merge(other.layers[name]) for name, counts in self.layers.items()}
        return FormulaPartial(layers, self.overlap + other.overlap, self.size + other.size,
                              self.images + other.images)


class FormulaCounts:
    """The IoU pass's accumulator for a :class:`FormulaRequest` (``core.iou.CountsAccumulator``).

    Build it with ``functools.partial(FormulaCounts, request)``: the pass adds ``(thresholds, vocabulary,
    semantics, device)``. Paper semantics only: labels are united across layers, as the tally counts them.
    """

    def __init__(self, request: FormulaRequest, thresholds: Mapping[str, np.ndarray], vocabulary: Vocabulary,
                 semantics: str, device: str | torch.device = "cpu") -> None:
        if semantics != "paper":
            raise ValueError("formula counts follow the paper's semantics only")
        self.request = request
        self.device = torch.device(device)
        category_of = vocabulary.primary_category_index()
        self.labels_size = int(category_of.shape[0])
        self.categories = len(vocabulary.categories)
        formulas = len(request.formulas)
        # Each formula's domain: the categories of its concepts (as a (J, C) table).
        cats = np.zeros((formulas, self.categories), dtype=bool)
        for j, formula in enumerate(request.formulas):
            cats[j, category_of[leaves(formula)]] = True
        self.formula_categories = torch.from_numpy(cats).to(self.device)
        self.thresholds = {name: torch.from_numpy(np.asarray(t, dtype=np.float64)).to(self.device)
                           for name, t in thresholds.items()}
        self.slots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, (units, formula) in request.slots.items():
            units_t = torch.as_tensor(np.asarray(units, dtype=np.int64), device=self.device)
            formula_t = torch.as_tensor(np.asarray(formula, dtype=np.int64), device=self.device)
            if formula_t.numel() and bool((formula_t[1:] < formula_t[:-1]).any()):
                raise ValueError("the slots of a layer must be sorted by formula")
            self.slots[name] = (units_t, formula_t)
            n = int(units_t.numel())
            self.counts[name] = (torch.zeros(n * self.labels_size, dtype=torch.int64, device=self.device),
                                 torch.zeros(n, dtype=torch.int64, device=self.device),
                                 torch.zeros(n, self.categories, dtype=torch.int64, device=self.device))
        self.overlap = torch.zeros(formulas * self.labels_size, dtype=torch.int64, device=self.device)
        self.size = torch.zeros(formulas, dtype=torch.int64, device=self.device)
        self.images = 0
        self._batch: LabelBatch | None = None
        self._leaves: dict[int, torch.Tensor] = {}
        self._chunks: dict[int, torch.Tensor] = {}

    # ---- CountsAccumulator

    def add_truth(self, indices: np.ndarray, truth: torch.Tensor) -> None:
        self.images += len(indices)

    def add(self, layer: str, indices: np.ndarray, activations: torch.Tensor, labels: LabelBatch) -> None:
        if labels is not self._batch:  # a new batch: its formula masks, and the counts of formulas alone
            self._start_batch(labels)
        slots = self.slots.get(layer)
        if slots is None or slots[0].numel() == 0:
            return
        self._add_layer(layer, activations, labels, *slots)

    def partial(self) -> FormulaPartial:
        layers = {}
        for name, (joint, inter, area) in self.counts.items():
            layers[name] = LayerFormulaCounts(joint.view(-1, self.labels_size).cpu().numpy(), inter.cpu().numpy(),
                                              area.cpu().numpy())
        return FormulaPartial(layers, self.overlap.view(-1, self.labels_size).cpu().numpy(), self.size.cpu().numpy(),
                              self.images)

    # ---- masks

    def _start_batch(self, labels: LabelBatch) -> None:
        self._batch, self._leaves, self._chunks = labels, {}, {}
        for chunk in range(self._chunk_count(labels)):
            start, masks = self._chunk(labels, chunk)
            self._count_formulas(labels, start, masks)

    def _pixels(self, labels: LabelBatch) -> int:
        return int(labels.layers.shape[0]) * labels.shape[0] * labels.shape[1]

    def _chunk_size(self, labels: LabelBatch) -> int:
        return max(1, MASK_BUDGET // 2 // max(1, self._pixels(labels)))

    def _chunk_count(self, labels: LabelBatch) -> int:
        return -(-len(self.request.formulas) // self._chunk_size(labels))

    def _chunk(self, labels: LabelBatch, chunk: int) -> tuple[int, torch.Tensor]:
        """The masks ``(c, N·S)`` of the formulas of one chunk, and the index of its first formula; kept for
        the batch while they fit in half the budget (the concept masks get the other half)."""
        size = self._chunk_size(labels)
        start = chunk * size
        masks = self._chunks.get(chunk)
        if masks is None:
            formulas = self.request.formulas[start:start + size]
            masks = torch.stack([self._mask(labels, f) for f in formulas])
            if (len(self._chunks) + 1) * masks.numel() <= MASK_BUDGET // 2:
                self._chunks[chunk] = masks
        return start, masks

    def _mask(self, labels: LabelBatch, formula: Formula) -> torch.Tensor:
        """A formula's mask over the batch's pixels, ``(N·S,)`` bool."""
        if isinstance(formula, Leaf):
            return self._leaf(labels, formula.label)
        left, right = self._mask(labels, formula.left), self._mask(labels, formula.right)
        if formula.op == AND:
            return left & right
        if formula.op == OR:
            return left | right
        if formula.op == AND_NOT:
            return left & ~right
        raise ValueError(f"unknown operator {formula.op!r}")

    def _leaf(self, labels: LabelBatch, label: int) -> torch.Tensor:
        """A concept's mask: any label layer gives it at the pixel, or it is an image-level label."""
        mask = self._leaves.get(label)
        if mask is None:
            n = labels.layers.shape[0]
            mask = (labels.layers == label).any(dim=1) | (labels.image_labels == label).any(dim=1, keepdim=True)
            mask = mask.reshape(-1)
            if (len(self._leaves) + 1) * n * labels.layers.shape[2] > MASK_BUDGET // 2:
                self._leaves = {}
            self._leaves[label] = mask
        return mask

    # ---- counting

    def _labels_under(self, labels: LabelBatch, flat: torch.Tensor) -> torch.Tensor:
        """The pixel labels ``(P, K)`` at flat pixel indices (image · S + pixel) of the batch."""
        pixels = labels.layers.shape[2]
        return labels.layers[flat // pixels, :, flat % pixels]

    def _add_image_level(self, into: torch.Tensor, labels: LabelBatch, per_image: torch.Tensor, first: int) -> None:
        """Image-level labels cover every pixel: ``per_image`` ``(R, N)`` pixels of each row (slot or formula
        ``first + r``) in each image adds to the row's count of each of the image's image-level labels."""
        levels = labels.image_labels  # (N, J)
        if levels.numel() == 0:
            return
        rows, images = torch.nonzero(per_image, as_tuple=True)
        if rows.numel() == 0:
            return
        level = levels[images]  # (hits, J)
        weight = per_image[rows, images].unsqueeze(1).expand_as(level)
        ok = level > 0
        keys = (rows + first).unsqueeze(1).expand_as(level)[ok] * self.labels_size + level[ok]
        into.index_add_(0, keys, weight[ok])

    def _count_formulas(self, labels: LabelBatch, start: int, masks: torch.Tensor) -> None:
        """``|F|`` and ``|F ∩ l|`` for every l, for the formulas of one chunk."""
        n = labels.layers.shape[0]
        self.size[start:start + masks.shape[0]] += masks.sum(dim=1)
        row, flat = torch.nonzero(masks, as_tuple=True)
        under = self._labels_under(labels, flat)
        keep = under > 0
        keys = (row + start).unsqueeze(1).expand_as(under)[keep] * self.labels_size + under[keep]
        self.overlap += torch.bincount(keys, minlength=self.overlap.numel())
        self._add_image_level(self.overlap, labels, masks.view(masks.shape[0], n, -1).sum(dim=2), start)

    def _add_layer(self, layer: str, activations: torch.Tensor, labels: LabelBatch, slot_units: torch.Tensor,
                   slot_formula: torch.Tensor) -> None:
        joint, inter, area = self.counts[layer]
        n = activations.shape[0]
        pixels = labels.layers.shape[2]
        sh, sw = labels.shape
        # The units of the layer's slots, compactly: unit_of[k] is the k-th such unit, slot_unit[s] its k.
        unit_of, slot_unit = torch.unique(slot_units, return_inverse=True)
        acts = activations[:, unit_of.to(activations.device)].to(self.device)
        thresholds = self.thresholds[layer][unit_of]
        peaks = acts.amax(dim=(2, 3)).double()
        image_idx, unit_idx = torch.nonzero(peaks > thresholds, as_tuple=True)
        found_images, found_units, found_pixels = [], [], []
        for first in range(0, image_idx.numel(), PAIR_CHUNK):
            images, units = image_idx[first:first + PAIR_CHUNK], unit_idx[first:first + PAIR_CHUNK]
            pair, pixel = active_pixels(acts[images, units], thresholds[units], sh, sw)
            found_images.append(images[pair])
            found_units.append(units[pair])
            found_pixels.append(pixel)
        if not found_images:
            return
        mask_image, mask_unit = torch.cat(found_images), torch.cat(found_units)
        mask_flat = mask_image * pixels + torch.cat(found_pixels)
        count = len(unit_of)
        # Mask area per (image, unit), and the area term: images in the formula's domain or having c.
        areas = torch.bincount(mask_image * count + mask_unit, minlength=n * count).view(n, count)
        # (Elementwise sums, not matrix products: integer matmul is not there on every device.)
        has = labels.has_category  # (N, C)
        weight = areas[:, slot_unit].T  # (S, N)
        in_domain = (self.formula_categories[slot_formula].unsqueeze(1) & has.unsqueeze(0)).any(dim=2)  # (S, N)
        area += (weight * in_domain).sum(dim=1, keepdim=True) \
            + ((weight * ~in_domain).unsqueeze(2) * has.unsqueeze(0)).sum(dim=1)

        # The active pixels grouped by unit, so that each slot takes its unit's run of them.
        order = torch.argsort(mask_unit, stable=True)
        mask_flat = mask_flat[order]
        per_unit = torch.bincount(mask_unit, minlength=count)
        offsets = torch.cumsum(per_unit, 0) - per_unit
        size = self._chunk_size(labels)
        bounds = torch.searchsorted(slot_formula, torch.arange(0, len(self.request.formulas) + size, size,
                                                               device=self.device))
        for chunk in range(self._chunk_count(labels)):
            low, high = int(bounds[chunk]), int(bounds[chunk + 1])
            if low == high:
                continue
            start, masks = self._chunk(labels, chunk)
            runs = per_unit[slot_unit[low:high]]
            total = int(runs.sum())
            if total == 0:
                continue
            slot = torch.repeat_interleave(torch.arange(low, high, device=self.device), runs)
            begin = torch.repeat_interleave(offsets[slot_unit[low:high]] - (torch.cumsum(runs, 0) - runs), runs)
            flat = mask_flat[begin + torch.arange(total, device=self.device)]
            hit = masks[slot_formula[slot] - start, flat]
            slot, flat = slot[hit], flat[hit]
            inter += torch.bincount(slot, minlength=inter.numel())
            under = self._labels_under(labels, flat)
            keep = under > 0
            keys = slot.unsqueeze(1).expand_as(under)[keep] * self.labels_size + under[keep]
            joint += torch.bincount(keys, minlength=joint.numel())
            per_image = torch.bincount((slot - low) * n + flat // pixels, minlength=(high - low) * n).view(-1, n)
            self._add_image_level(joint, labels, per_image, low)
