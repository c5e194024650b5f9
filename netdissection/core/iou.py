"""The IoU pass: intersection and activation counts, batched arithmetic on torch tensors (CPU or CUDA).

Two facts make it fast and still exact:

* Bilinear upsampling is a convex combination of source values, so a unit whose raw map never
  exceeds its threshold in an image has an empty mask there, and within a map only the cells with
  a corner above the threshold can hold mask pixels (see ``upsample.active_pixels``). Only those
  cells are evaluated — usually a small fraction of the (image, unit, pixel) space.
* Intersections are counted with one ``bincount`` over the label ids under the active pixels,
  keyed by (unit, label), instead of comparing masks with every concept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .partials import CountsPartial, LayerCounts
from .types import Vocabulary
from .upsample import active_pixels

log = logging.getLogger(__name__)

#: Semantics of the counts: "paper" (the protocol) or "lite" (NetDissect-Lite's numbers).
SEMANTICS = ("paper", "lite")

#: (image, unit) pairs processed at once; bounds the working memory of the pass.
PAIR_CHUNK = 4096


@dataclass
class LabelBatch:
    """The labels of a batch of images, prepared once and shared by every layer.

    ``layers`` ``(N, K, S)`` label numbers per flattened pixel (paper semantics: a label repeated at
    the same pixel in another layer is zeroed so it counts once); ``image_labels`` ``(N, J)``
    image-level labels padded with 0; ``has_category`` ``(N, C)`` which categories each image has;
    ``truth`` ``(N, L)`` each image's truth counts G (their sum over the batch is the batch's G).
    """

    layers: torch.Tensor
    image_labels: torch.Tensor
    has_category: torch.Tensor
    shape: tuple[int, int]
    truth: torch.Tensor | None = None


def prepare_labels(layers: torch.Tensor, image_labels: torch.Tensor, category_of: torch.Tensor,
                   categories: int, semantics: str) -> tuple[LabelBatch, torch.Tensor]:
    """Prepare a batch's labels; return them and the batch's truth counts G (per label number).

    ``layers`` ``(N, K, sh, sw)`` int64, ``image_labels`` ``(N, J)`` int64 (0 = padding),
    ``category_of`` ``(L,)`` the primary category index of each label number (-1 = not a concept).
    """
    n, k, sh, sw = layers.shape
    size = category_of.shape[0]
    # Label numbers outside the vocabulary (or of unselected categories) count as unlabelled.
    # category_of[0] is -1, so a 0 stays 0.
    flat = layers.reshape(n, k, sh * sw)
    flat = torch.where((flat > 0) & (flat < size), flat, 0)
    flat = torch.where(category_of[flat] >= 0, flat, 0)
    image_labels = torch.where((image_labels > 0) & (image_labels < size), image_labels, 0)
    image_labels = torch.where(category_of[image_labels] >= 0, image_labels, 0)
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
    image_of = torch.arange(n, device=layers.device).view(n, 1) * size
    per_image = torch.bincount((flat.reshape(n, -1) + image_of).reshape(-1), minlength=n * size)
    per_image += torch.bincount((image_labels + image_of).reshape(-1), minlength=n * size) * (sh * sw)
    per_image = per_image.view(n, size)
    per_image[:, 0] = 0
    truth = per_image.sum(dim=0)

    # has_category[x, c]: any label of primary category c occurs in x (pixel or image level).
    one_hot = torch.zeros(size, categories + 1, dtype=torch.int64, device=layers.device)
    one_hot[torch.arange(size, device=layers.device), torch.where(category_of >= 0, category_of, categories)] = 1
    has = (per_image > 0).long() @ one_hot > 0
    batch = LabelBatch(flat, image_labels, has[:, :categories], (sh, sw), per_image)
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

    def add(self, activations: torch.Tensor, labels: LabelBatch, group: torch.Tensor | None = None) -> None:
        """Count one batch: ``activations`` ``(N, U, h, w)`` raw maps of the batch's images; ``group``
        ``(N,)`` the group of each image (with ``groups`` > 1)."""
        n, units = activations.shape[:2]
        peaks = activations.amax(dim=(2, 3)).double()
        image_idx, unit_idx = torch.nonzero(peaks > self.thresholds, as_tuple=True)
        self.pairs_seen += n * units
        self.pairs_upsampled += int(image_idx.numel())
        for start in range(0, image_idx.numel(), PAIR_CHUNK):
            stop = start + PAIR_CHUNK
            self._add_pairs(activations, labels, image_idx[start:stop], unit_idx[start:stop], group)

    def _add_pairs(self, activations: torch.Tensor, labels: LabelBatch, image_idx: torch.Tensor,
                   unit_idx: torch.Tensor, group: torch.Tensor | None = None) -> None:
        sh, sw = labels.shape
        maps = activations[image_idx, unit_idx]
        pair, pixel = active_pixels(maps, self.thresholds[unit_idx], sh, sw)
        area = torch.bincount(pair, minlength=len(image_idx))
        under = labels.layers[image_idx[pair], :, pixel]  # (active pixels, K) label numbers
        # The row each pair counts into: its unit, in its image's group when there are groups.
        row = unit_idx if group is None else group[image_idx] * self.units + unit_idx
        owner = row[pair].unsqueeze(1).expand_as(under)
        keep = under > 0
        keys = owner[keep] * self.size + under[keep]
        if self.groups == 1:
            self.intersection += torch.bincount(keys, minlength=self.units * self.size)
        else:  # a bincount over every group's counts would allocate all of them for each chunk
            self.intersection.index_add_(0, keys, torch.ones_like(keys, dtype=self.intersection.dtype))

        # Image-level labels cover every pixel: each adds the whole mask area.
        image_level = labels.image_labels[image_idx]  # (pairs, J)
        if image_level.numel():
            weight = area.unsqueeze(1).expand_as(image_level)
            ok = (image_level > 0) & (weight > 0)
            keys = row.unsqueeze(1).expand_as(image_level)[ok] * self.size + image_level[ok]
            self.intersection.index_add_(0, keys, weight[ok].to(self.intersection.dtype))

        if self.semantics == "paper":
            has = labels.has_category[image_idx].long()  # (pairs, C)
        else:
            # NetDissect-Lite counts a mask only in images where the category occurs under it.
            sentinel = self.categories
            cats = self.category_of[under[keep]]
            cats[cats < 0] = sentinel
            rows = pair.unsqueeze(1).expand_as(under)[keep]
            has = torch.zeros(len(image_idx), self.categories + 1, dtype=torch.int64, device=self.device)
            has[rows, cats] = 1
            level_cats = self.category_of[image_level]
            level_cats[(level_cats < 0) | (image_level == 0)] = sentinel
            has.scatter_(1, level_cats, 1)
            has = has[:, : self.categories] * (area > 0).long().unsqueeze(1)
        self.activation.index_add_(0, row, has * area.unsqueeze(1))

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
