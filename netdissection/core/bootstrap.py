"""How sure the numbers are: a bootstrap over the images, from counts kept per block during the IoU pass.

``--bootstrap B`` resamples the dataset's images with replacement B times and reports, per unit, a 95%
interval for its best IoU, how often its label stays the same and how often its detector status does;
per layer, 95% intervals for the detector counts and unique concepts per category by both counting rules.
The model does not run again: every count of the protocol (I, G, A) is a sum over images, so a resample's
counts are sums of the same per-image counts, weighted by how often each image was drawn.

Why blocks. Keeping each image's counts would take O(images × units × concepts) memory. Instead the images
are dealt at random into ``K`` blocks of (nearly) equal size, and the IoU pass keeps the counts of each
block (:class:`BlockCounts`, an IoU-pass accumulator): O(K × units × concepts), whatever the number of
images. A resample draws K blocks with replacement (multinomial weights), so its counts are the weighted
sums of the block counts. Images are dealt at random from the seed, not by index order, so the blocks are
exchangeable (a dataset's order follows its sources: Broden's first images are all ADE20K scenes) and the
block sums are independent draws of the same distribution: resampling them estimates the spread of a sum
over the whole dataset as resampling images would, with K draws instead of N.

``K`` = :data:`BLOCKS` (or the number of images, when there are fewer): 50 blocks give the spread of a sum
to within ~10% (a standard deviation estimated from K draws is off by about 1/√(2K)), and keep the memory at
``50 × 4`` bytes per (unit, label number) — 120 MB for 512 units on Broden's 1,197 concepts, about a tenth
of what the run itself takes. The counts of a block are int32 (promoted to int64 should a block hold more
label pixels than int32 counts); denser storage was not needed: on a Broden-like set most (unit, concept)
pairs meet in most blocks, so a sparse one would be larger, and a per-unit shortlist of concepts cannot
be chosen before the pass has seen every image. Each block's counts are exact: they add up to the run's
I, G, A (the run's own counts are their sum).

What is held fixed: the thresholds are the run's (the counts at another threshold would need the maps
again); the intervals are those of the IoU at these thresholds. Intervals are percentile intervals (2.5%
and 97.5% of the B resampled values).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DissectionError
from .partials import CountsPartial, LayerCounts
from .types import DETECTOR_IOU, LayerResult, Vocabulary

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .iou import LabelBatch

log = logging.getLogger(__name__)

#: Blocks the images are dealt into (fewer when there are fewer images).
BLOCKS = 50
#: The fewest resamples that make a 95% percentile interval (200 are customary).
MIN_RESAMPLES = 20
#: Two-sided confidence of every interval.
CONFIDENCE = 0.95
#: A unit whose detector status is the run's in fewer resamples than this is flagged as unstable.
STABLE = 0.95
#: Working memory of the resampling: the resampled IoUs of a chunk of units at a time.
CHUNK_BYTES = 64 << 20
INT32_MAX = 2**31 - 1
#: The streams drawn from the seed: one deals the images into blocks, the other draws the resamples.
_DEAL, _DRAW = 0, 1


def check_bootstrap(resamples: int, seed: int) -> None:
    """``--bootstrap`` and ``--bootstrap-seed`` as the user gave them (0 resamples: no bootstrap)."""
    if resamples < 0:
        raise DissectionError(f"--bootstrap must be 0 (no bootstrap) or a number of resamples, not {resamples}")
    if 0 < resamples < MIN_RESAMPLES:
        raise DissectionError(f"--bootstrap {resamples} is too few resamples for a 95% interval; use at least "
                              f"{MIN_RESAMPLES} (200 is customary)")
    if seed < 0:
        raise DissectionError(f"--bootstrap-seed must be a non-negative integer, not {seed}")


def deal_blocks(images: int, blocks: int, seed: int) -> np.ndarray:
    """The block of each dataset index: the images in the order of a random permutation drawn from the
    seed, dealt round-robin into the blocks, so block sizes differ by at most one."""
    order = np.random.default_rng([seed, _DEAL]).permutation(images)
    block_of = np.empty(images, dtype=np.int64)
    block_of[order] = np.arange(images, dtype=np.int64) % blocks
    return block_of


@dataclass(frozen=True)
class BootstrapSpec:
    """A run's bootstrap: ``resamples`` draws, ``seed`` for the blocks and the draws, at most ``blocks`` blocks."""

    resamples: int
    seed: int = 0
    blocks: int = BLOCKS

    def __post_init__(self) -> None:
        check_bootstrap(self.resamples, self.seed)
        if self.resamples == 0:
            raise ValueError("a bootstrap needs resamples; without one, run with no BootstrapSpec")

    def block_count(self, images: int) -> int:
        return max(1, min(self.blocks, images))

    def block_of(self, images: int) -> np.ndarray:
        return deal_blocks(images, self.block_count(images), self.seed)

    def weights(self, blocks: int) -> np.ndarray:
        """``(resamples, blocks)``: how many times each resample draws each block (each row sums to blocks)."""
        rng = np.random.default_rng([self.seed, _DRAW])
        return rng.multinomial(blocks, np.full(blocks, 1.0 / blocks), size=self.resamples)

    def accumulator(self, images: int) -> BlockCountsFactory:
        """The IoU pass's accumulator factory for a dataset of ``images`` images (picklable)."""
        return BlockCountsFactory(images, self.block_count(images), self.seed)

    def provenance(self, images: int) -> dict[str, Any]:
        """What a reader needs to redo the same bootstrap: how images map to blocks, and the draws."""
        blocks = self.block_count(images)
        return {
            "resamples": self.resamples,
            "seed": self.seed,
            "blocks": blocks,
            "images_per_block": [images // blocks, -(-images // blocks)],
            "assignment": f"image i goes to block rank(i) mod {blocks}, rank(i) being its position in "
                          f"numpy.random.default_rng([{self.seed}, {_DEAL}]).permutation({images})",
            "resampling": f"resample r draws each block w[r, b] times: numpy.random.default_rng([{self.seed}, "
                          f"{_DRAW}]).multinomial({blocks}, [1/{blocks}] * {blocks}, size={self.resamples})",
            "interval": f"{CONFIDENCE:.0%} percentile interval of the resampled values",
            "thresholds": "the run's, held fixed",
        }

    def attach(self, results: Mapping[str, LayerResult], counts: CountsPartial) -> None:
        """Compute every layer's intervals from the merged block counts and attach them to its result."""
        if not isinstance(counts, BlockCountsPartial):
            raise TypeError("a bootstrap needs the IoU pass's block counts (BootstrapSpec.accumulator)")
        weights = self.weights(counts.block_truth.shape[0]).astype(np.float64)
        for name, result in results.items():
            result.bootstrap = layer_bootstrap(result, counts.blocks[name], counts.block_truth, weights)


# ---- the IoU-pass accumulator -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockCountsFactory:
    """``factory(thresholds, vocabulary, semantics, device)`` → :class:`BlockCounts` (the scheduler's
    ``AccumulatorFactory``); holds only numbers, so it travels to other processes cheaply."""

    images: int
    blocks: int
    seed: int

    def __call__(self, thresholds: Mapping[str, np.ndarray], vocabulary: Vocabulary, semantics: str,
                 device: str | torch.device = "cpu") -> BlockCounts:
        return BlockCounts(thresholds, vocabulary, semantics, device, deal_blocks(self.images, self.blocks, self.seed),
                           self.blocks)


class BlockCounts:
    """I, A per layer and G, per block of images (``block_of[i]``: the block of dataset index i).

    The run's own counts are the sums over the blocks; the partial carries both."""

    def __init__(self, thresholds: Mapping[str, np.ndarray], vocabulary: Vocabulary, semantics: str,
                 device: str | torch.device, block_of: np.ndarray, blocks: int) -> None:
        import torch

        from .iou import IoUAccumulator

        category_of = torch.from_numpy(vocabulary.primary_category_index())
        categories = len(vocabulary.categories)
        self.blocks = blocks
        self.device = torch.device(device)
        self.block_of = torch.from_numpy(np.asarray(block_of, dtype=np.int64))
        self.layers = {name: IoUAccumulator(torch.from_numpy(np.asarray(t)).to(device), category_of, categories,
                                            semantics, groups=blocks, dtype=torch.int32)
                       for name, t in thresholds.items()}
        self.truth = torch.zeros(blocks, category_of.shape[0], dtype=torch.int64)
        self.images = torch.zeros(blocks, dtype=torch.int64)
        # The most any intersection count of a block can reach: its label pixels, layer by layer.
        self.bound = torch.zeros(blocks, dtype=torch.int64)
        self.total_truth = torch.zeros(category_of.shape[0], dtype=torch.int64)
        self._labels: LabelBatch | None = None  # the batch whose per-block truth is counted
        held = sum(acc.intersection.nbytes for acc in self.layers.values())
        log.log(logging.INFO if held > 256 << 20 else logging.DEBUG,
                "bootstrap: the IoU pass keeps %d blocks of counts, %.0f MB", blocks, held / 2**20)

    def add_truth(self, indices: np.ndarray, truth: torch.Tensor) -> None:
        # Each image's own truth counts come with the labels in ``add``; the batch's sum checks them.
        self.total_truth += truth.cpu()

    def add(self, layer: str, indices: np.ndarray, activations: torch.Tensor, labels: LabelBatch) -> None:
        import torch

        group = self.block_of[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
        if labels is not self._labels:  # the first layer of a batch: its images' truth, per block
            self._labels = labels
            if labels.truth is None:
                raise TypeError("block counts need each image's truth counts (LabelBatch.truth)")
            self.truth.index_add_(0, group, labels.truth.cpu())
            self.images.index_add_(0, group, torch.ones_like(group))
            _, k, pixels = labels.layers.shape
            self.bound.index_add_(0, group, torch.full_like(group, pixels * (k + labels.image_labels.shape[1])))
            if int(self.bound.max()) > INT32_MAX:
                self._widen()
        self.layers[layer].add(activations, labels, group.to(self.device))

    def _widen(self) -> None:
        import torch

        for acc in self.layers.values():
            if acc.intersection.dtype != torch.int64:
                log.debug("a block's counts may pass int32: keeping them as int64")
                acc.intersection = acc.intersection.long()

    def partial(self) -> BlockCountsPartial:
        totals, blocks = {}, {}
        for name, acc in self.layers.items():
            intersection, activation = acc.counts()
            block = LayerCounts(intersection.numpy(), activation.numpy())
            blocks[name] = block
            totals[name] = LayerCounts(block.intersection.sum(axis=0, dtype=np.int64),
                                       block.activation.sum(axis=0, dtype=np.int64))
        truth = self.truth.numpy()
        if not np.array_equal(truth.sum(axis=0), self.total_truth.numpy()):
            raise RuntimeError("the per-block truth counts do not add up to the batches' truth counts")
        return BlockCountsPartial(totals, truth.sum(axis=0), int(self.images.sum()), blocks, truth,
                                  self.images.numpy().copy())


def _add_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b without wrapping: int32 while the sum fits, else int64."""
    if a.dtype == np.int32 and b.dtype == np.int32 and int(a.max(initial=0)) + int(b.max(initial=0)) <= INT32_MAX:
        return a + b
    return np.add(a, b, dtype=np.int64)


@dataclass
class BlockCountsPartial(CountsPartial):
    """A shard's IoU pass with the counts of every block beside their sums (``layers``, ``truth``).

    ``blocks``: per layer, I ``(K, U, L)`` and A ``(K, U, C)``; ``block_truth`` G ``(K, L)``;
    ``block_images`` ``(K,)``. Shards merge by adding block to block."""

    blocks: dict[str, LayerCounts] = field(default_factory=dict)
    block_truth: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    block_images: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def merge(self, other: CountsPartial) -> BlockCountsPartial:
        if not isinstance(other, BlockCountsPartial):
            raise TypeError("cannot merge block counts with counts summed over a shard")
        totals = CountsPartial.merge(self, other)
        blocks = {name: LayerCounts(_add_exact(b.intersection, other.blocks[name].intersection),
                                    b.activation + other.blocks[name].activation)
                  for name, b in self.blocks.items()}
        return BlockCountsPartial(totals.layers, totals.truth, totals.images, blocks,
                                  self.block_truth + other.block_truth, self.block_images + other.block_images)


# ---- the resampling -------------------------------------------------------------------------------------------


@dataclass
class LayerBootstrap:
    """A layer's bootstrap: per unit (in unit order) and per count of the summary.

    ``score_interval`` ``(U, 2)``: the 95% interval of the unit's best IoU; ``label_stability`` ``(U,)``: the
    share of resamples whose best concept is the run's; ``detector_stability`` ``(U,)``: the share whose
    detector status (best IoU ≥ 0.04) is the run's. ``counts``: for every count of the layer summary
    (``detectors``, ``unique_labels``, ``paper_unique_labels_total``, and per category
    ``detectors_by_category``, ``unique_labels_by_category``, ``paper_units_by_category``,
    ``paper_unique_labels_by_category``) its interval ``[lo, hi]``.
    """

    resamples: int
    blocks: int
    score_interval: np.ndarray
    label_stability: np.ndarray
    detector_stability: np.ndarray
    counts: dict[str, Any]

    @property
    def unstable(self) -> np.ndarray:
        """Units whose detector status is the run's in fewer than :data:`STABLE` of the resamples."""
        return self.detector_stability < STABLE

    def to_json(self) -> dict[str, Any]:
        """What ``summary.json`` keeps of it (the per-unit arrays go with the counts)."""
        return {"resamples": self.resamples, "blocks": self.blocks, "confidence": CONFIDENCE,
                "intervals": self.counts, "unstable_units": [int(u) + 1 for u in np.flatnonzero(self.unstable)]}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"bootstrap_score_interval": self.score_interval, "bootstrap_label_stability": self.label_stability,
                "bootstrap_detector_stability": self.detector_stability}

    @classmethod
    def load(cls, summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> LayerBootstrap:
        return cls(int(summary["resamples"]), int(summary["blocks"]), np.asarray(arrays["bootstrap_score_interval"]),
                   np.asarray(arrays["bootstrap_label_stability"]),
                   np.asarray(arrays["bootstrap_detector_stability"]), dict(summary["intervals"]))


@dataclass
class Resampled:
    """Each resample's labelling of every unit: the best concept and its IoU, overall and per category."""

    labels: np.ndarray  # (B, U) label numbers
    scores: np.ndarray  # (B, U)
    category_labels: np.ndarray  # (B, U, C)
    category_scores: np.ndarray  # (B, U, C)


def resample_scores(result: LayerResult, blocks: LayerCounts, block_truth: np.ndarray,
                    weights: np.ndarray) -> Resampled:
    """The labelling of every unit in each resample: counts ``weights @ blocks`` (exact: integers in
    float64), IoU as :func:`~netdissection.core.scores.iou_matrix` computes it, best concepts with ties to
    the lower label number, as :func:`~netdissection.core.scores.unit_labels` picks them."""
    category_of = result.vocabulary.primary_category_index()
    # The concepts by category, then label number: each category's IoUs are a slice, no copy.
    columns = np.flatnonzero(category_of >= 0)
    columns = columns[np.argsort(category_of[columns], kind="stable")]
    resamples, k = weights.shape
    units, categories = result.units, len(result.vocabulary.categories)
    bounds = np.searchsorted(category_of[columns], np.arange(categories + 1))
    category_labels = np.zeros((resamples, units, categories), dtype=np.int64)
    category_scores = np.zeros((resamples, units, categories))
    activation = (weights @ blocks.activation.reshape(k, -1).astype(np.float64)).reshape(resamples, units, -1)
    truth = weights @ block_truth[:, columns].astype(np.float64)  # (B, L')
    step = max(1, CHUNK_BYTES // (resamples * max(1, columns.size) * 8 * 3))
    for start in range(0, units, step):
        chunk = slice(start, min(units, start + step))
        n = chunk.stop - chunk.start
        block = blocks.intersection[:, chunk][:, :, columns].astype(np.float64).reshape(k, -1)
        inter = (weights @ block).reshape(resamples, n, columns.size)
        for c in range(categories):
            lo, hi = bounds[c], bounds[c + 1]
            if lo == hi:
                continue
            within = inter[:, :, lo:hi]
            denominator = activation[:, chunk, c, None] + truth[:, None, lo:hi] - within
            iou = np.zeros_like(within)
            np.divide(within, denominator, out=iou, where=denominator > 0)
            top = iou.argmax(axis=2)
            category_labels[:, chunk, c] = columns[lo:hi][top]
            category_scores[:, chunk, c] = np.take_along_axis(iou, top[:, :, None], axis=2)[:, :, 0]
    # The best overall is the best of the categories' bests; among equal IoUs, the lowest label number.
    scores = category_scores.max(axis=2, initial=0.0)
    tied = (category_scores == scores[:, :, None]) & (category_labels > 0)
    labels = np.where(tied, category_labels, np.iinfo(np.int64).max).min(axis=2, initial=np.iinfo(np.int64).max)
    labels[labels == np.iinfo(np.int64).max] = columns.min(initial=0)
    return Resampled(labels, scores, category_labels, category_scores)


def resampled_counts(resampled: Resampled, vocabulary: Vocabulary,
                     threshold: float = DETECTOR_IOU) -> dict[str, Any]:
    """Each resample's detector counts by both rules, as :func:`~netdissection.core.scores.count_detectors`
    counts them: arrays ``(B,)``, per category in dicts."""
    category_of = vocabulary.primary_category_index()
    resamples, units = resampled.labels.shape
    rows = np.repeat(np.arange(resamples), units).reshape(resamples, units)
    detector = resampled.scores >= threshold
    used = np.zeros((resamples, vocabulary.size), dtype=bool)  # labels of the report rule's detectors
    used[rows[detector], resampled.labels[detector]] = True
    label_category = category_of[resampled.labels]
    paper_used = np.zeros_like(used)
    counts: dict[str, Any] = {
        "detectors": detector.sum(axis=1), "unique_labels": used.sum(axis=1),
        "detectors_by_category": {}, "unique_labels_by_category": {},
        "paper_units_by_category": {}, "paper_unique_labels_by_category": {},
    }
    for c, name in enumerate(vocabulary.categories):
        member = category_of == c
        counts["detectors_by_category"][name] = (detector & (label_category == c)).sum(axis=1)
        counts["unique_labels_by_category"][name] = used[:, member].sum(axis=1)
        hit = resampled.category_scores[:, :, c] > threshold
        counts["paper_units_by_category"][name] = hit.sum(axis=1)
        paper_used[rows[hit], resampled.category_labels[:, :, c][hit]] = True
        counts["paper_unique_labels_by_category"][name] = paper_used[:, member].sum(axis=1)
    counts["paper_unique_labels_total"] = sum(counts["paper_unique_labels_by_category"].values(),
                                              np.zeros(resamples, dtype=np.int64))
    return counts


def count_interval(values: np.ndarray) -> list[int]:
    """The 95% interval of a count over the resamples, as counts that occurred (lower and higher ranks)."""
    tail = 100 * (1 - CONFIDENCE) / 2
    return [int(np.percentile(values, tail, method="lower")), int(np.percentile(values, 100 - tail, method="higher"))]


def layer_bootstrap(result: LayerResult, blocks: LayerCounts, block_truth: np.ndarray,
                    weights: np.ndarray) -> LayerBootstrap:
    """A layer's intervals and stabilities from its block counts and the resamples' ``weights`` ``(B, K)``."""
    from .scores import unit_labels

    resampled = resample_scores(result, blocks, block_truth, weights)
    labels, scores = unit_labels(result)
    tail = 100 * (1 - CONFIDENCE) / 2
    score_interval = np.percentile(resampled.scores, [tail, 100 - tail], axis=0).T
    detector = scores >= DETECTOR_IOU
    counts = resampled_counts(resampled, result.vocabulary)
    intervals = {key: ({c: count_interval(v) for c, v in value.items()} if isinstance(value, dict)
                       else count_interval(value)) for key, value in counts.items()}
    return LayerBootstrap(
        resamples=weights.shape[0], blocks=weights.shape[1], score_interval=score_interval,
        label_stability=(resampled.labels == labels[None, :]).mean(axis=0),
        detector_stability=((resampled.scores >= DETECTOR_IOU) == detector[None, :]).mean(axis=0),
        counts=intervals)
