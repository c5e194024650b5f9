"""One read of the dataset for a formula search: exact counts of formula masks against unit masks and
concepts, accumulated per shard by the IoU pass (``FormulaCounts`` is its accumulator) and merged by addition.

For every *slot* (a unit u and a formula F of its beam) and every concept l it counts

* ``joint[s, l] = |M_u ∩ F ∩ l|`` and ``inter[s] = |M_u ∩ F|``,
* ``area[s, c]`` = the mask area of u over the images in F's domain or having category c,

and for every formula ``overlap[F, l] = |F ∩ l|`` and ``size[F] = |F|``. From these, with the tally's
``I[u, l] = |M_u ∩ l|`` and ``G[l] = |l|``, the IoU of ``F AND l``, ``F OR l`` and ``F AND NOT l`` follows
exactly for every l at once (``compositional.expand``): a search step of the whole beam is one read.

Pixels that carry the same labels (the same label in each layer, the same image-level labels) are alike for
every formula and every concept, so each batch's pixels are grouped by their *signature* — its distinct rows
of labels, usually a few thousand for hundreds of thousands of pixels — and formulas are evaluated once per
signature, not per pixel. A unit's mask (``core.upsample.active_pixels``: only active pixels are visited)
becomes a count per signature. Every count is an integer sum: exact.
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

#: Bytes of formula-by-signature truth tables a batch holds at once.
TABLE_BUDGET = 64 << 20


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


def unique(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.unique(keys, return_inverse=True, return_counts=True)`` — through numpy on the CPU, where it
    is several times faster."""
    if keys.device.type != "cpu":
        values, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        return values, inverse, counts
    values_np, inverse_np, counts_np = np.unique(keys.numpy(), return_inverse=True, return_counts=True)
    return torch.from_numpy(values_np), torch.from_numpy(inverse_np.reshape(-1)), torch.from_numpy(counts_np)


#: Odd 64-bit multipliers that hash a row of labels to one key (collisions are checked for, never trusted).
_MIX = torch.from_numpy(np.random.default_rng(20200).integers(-(2**62), 2**62, size=64, dtype=np.int64) | 1)


def signatures(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of ``rows`` ``(P, W)``: each row's signature ``(P,)``, the signatures' rows
    ``(n, W)`` and how many rows each has ``(n,)``. Rows are grouped by a hash, then checked equal to their
    signature's row; a collision (never seen) falls back to an exact ``unique`` over rows."""
    width = rows.shape[1]
    mix = torch.cat([_MIX] * (width // len(_MIX) + 1))[:width].to(rows.device)
    _, inverse, counts = unique((rows * mix).sum(dim=1))
    inverse = inverse.to(rows.device)
    first = torch.empty(len(counts), dtype=torch.int64, device=rows.device)
    first.scatter_(0, inverse, torch.arange(rows.shape[0], device=rows.device))
    table = rows[first]
    if not torch.equal(table[inverse], rows):
        table, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    return inverse, table, counts.to(rows.device)


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
            self.slots[name] = (units_t, formula_t)
            n = int(units_t.numel())
            self.counts[name] = (torch.zeros(n * self.labels_size, dtype=torch.int64, device=self.device),
                                 torch.zeros(n, dtype=torch.int64, device=self.device),
                                 torch.zeros(n, self.categories, dtype=torch.int64, device=self.device))
        self.overlap = torch.zeros(formulas * self.labels_size, dtype=torch.int64, device=self.device)
        self.size = torch.zeros(formulas, dtype=torch.int64, device=self.device)
        self.images = 0
        self._batch: LabelBatch | None = None
        self._signature: torch.Tensor = torch.zeros(0, dtype=torch.int64)
        self._labels: torch.Tensor = torch.zeros(0, 0, dtype=torch.int64)
        self._member: torch.Tensor = torch.zeros(0, 0, dtype=torch.bool)
        self._tables: dict[int, torch.Tensor] = {}

    # ---- CountsAccumulator

    def add_truth(self, indices: np.ndarray, truth: torch.Tensor) -> None:
        self.images += len(indices)

    def add(self, layer: str, indices: np.ndarray, activations: torch.Tensor, labels: LabelBatch) -> None:
        if labels is not self._batch:  # a new batch: its signatures, and the counts of formulas alone
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

    # ---- signatures and truth tables

    def _start_batch(self, labels: LabelBatch) -> None:
        n, _, pixels = labels.layers.shape
        levels = labels.image_labels.shape[1]
        # Each pixel's labels: one per label layer, then the image's image-level labels.
        rows = torch.cat([labels.layers.transpose(1, 2),
                          labels.image_labels.unsqueeze(1).expand(n, pixels, levels)], dim=2).reshape(n * pixels, -1)
        self._batch, self._tables = labels, {}
        self._signature, self._labels, weight = signatures(rows)
        # member[g, l]: the pixels of signature g carry label l (label 0, unlabelled, is no concept).
        self._member = torch.zeros(len(weight), self.labels_size, dtype=torch.bool, device=self.device)
        self._member.scatter_(1, self._labels, True)
        self._member[:, 0] = False
        for chunk in range(self._chunk_count()):
            start, table = self._table(chunk)
            self.size[start:start + len(table)] += (table * weight).sum(dim=1)
            rows_of, signature = torch.nonzero(table, as_tuple=True)
            self._count_labels(self.overlap, rows_of + start, signature, weight[signature])

    def _chunk_size(self) -> int:
        return max(1, TABLE_BUDGET // 2 // max(1, self._member.shape[0]))

    def _chunk_count(self) -> int:
        return -(-len(self.request.formulas) // self._chunk_size())

    def _table(self, chunk: int) -> tuple[int, torch.Tensor]:
        """The truth of the formulas of one chunk on every signature ``(c, n)`` bool, and the chunk's first
        formula; kept for the batch while the tables fit the budget."""
        size = self._chunk_size()
        start = chunk * size
        table = self._tables.get(chunk)
        if table is None:
            table = torch.stack([self._truth(f) for f in self.request.formulas[start:start + size]])
            if (len(self._tables) + 1) * table.numel() <= TABLE_BUDGET:
                self._tables[chunk] = table
        return start, table

    def _truth(self, formula: Formula) -> torch.Tensor:
        """Whether the pixels of each signature are in the formula's mask ``(n,)``."""
        if isinstance(formula, Leaf):
            return self._member[:, formula.label]
        left, right = self._truth(formula.left), self._truth(formula.right)
        if formula.op == AND:
            return left & right
        if formula.op == OR:
            return left | right
        if formula.op == AND_NOT:
            return left & ~right
        raise ValueError(f"unknown operator {formula.op!r}")

    def _count_labels(self, into: torch.Tensor, row: torch.Tensor, signature: torch.Tensor,
                      weight: torch.Tensor) -> None:
        """Add ``weight`` pixels of ``signature`` to ``row``'s count of each label they carry."""
        under = self._labels[signature]  # (hits, W)
        keep = under > 0
        keys = row.unsqueeze(1).expand_as(under)[keep] * self.labels_size + under[keep]
        into.index_add_(0, keys, weight.unsqueeze(1).expand_as(under)[keep])

    # ---- a layer's masks

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
        count = len(unit_of)
        # Mask area per (image, unit), and the area term: images in the formula's domain or having c.
        # (Elementwise sums, not matrix products: integer matmul is not there on every device.)
        areas = torch.bincount(mask_image * count + mask_unit, minlength=n * count).view(n, count)
        has = labels.has_category  # (N, C)
        weight = areas[:, slot_unit].T  # (S, N)
        in_domain = (self.formula_categories[slot_formula].unsqueeze(1) & has.unsqueeze(0)).any(dim=2)  # (S, N)
        area += (weight * in_domain).sum(dim=1, keepdim=True) \
            + ((weight * ~in_domain).unsqueeze(2) * has.unsqueeze(0)).sum(dim=1)

        # Each unit's mask as pixels per signature: (unit, signature, pixels), grouped by unit.
        signatures_of = self._signature[mask_image * pixels + torch.cat(found_pixels)]
        keys, _, pixels_of = unique(mask_unit * len(self._labels) + signatures_of)
        keys, pixels_of = keys.to(self.device), pixels_of.to(self.device)
        pair_unit, pair_signature = keys // len(self._labels), keys % len(self._labels)
        per_unit = torch.bincount(pair_unit, minlength=count)
        offsets = torch.cumsum(per_unit, 0) - per_unit
        # Each slot takes its unit's run of pairs, a chunk of formulas at a time.
        size = self._chunk_size()
        order = torch.argsort(slot_formula, stable=True)
        bounds = torch.searchsorted(slot_formula[order], torch.arange(0, len(self.request.formulas) + size, size,
                                                                      device=self.device))
        for chunk in range(self._chunk_count()):
            low, high = int(bounds[chunk]), int(bounds[chunk + 1])
            if low == high:
                continue
            start, table = self._table(chunk)
            slots = order[low:high]
            runs = per_unit[slot_unit[slots]]
            total = int(runs.sum())
            if total == 0:
                continue
            slot = torch.repeat_interleave(slots, runs)
            begin = torch.repeat_interleave(offsets[slot_unit[slots]] - (torch.cumsum(runs, 0) - runs), runs)
            pair = begin + torch.arange(total, device=self.device)
            hit = table[slot_formula[slot] - start, pair_signature[pair]]
            slot, pair = slot[hit], pair[hit]
            inter.index_add_(0, slot, pixels_of[pair])
            self._count_labels(joint, slot, pair_signature[pair], pixels_of[pair])
