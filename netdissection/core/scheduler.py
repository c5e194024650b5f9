"""The scheduler: for every requested layer at once, the activation pass, the thresholds, the IoU pass.

The passes run over a *shard* of the dataset (any subset of its indices) in a ``ShardRunner``, which
returns plain partial results (``core/partials.py``) and keeps its shard's activation cache between
passes. ``run_passes`` runs them in this process, over one shard or several merged exactly. An
executor that runs shards elsewhere (one runner per worker) drives them the same way::

    partial = merge_all(r.activation_pass() for r in runners)
    thresholds = settle_thresholds(partial, lambda states: [r.threshold_round(states) for r in runners])
    counts = merge_all(r.iou_pass(thresholds) for r in runners)
    results = layer_results(partial, thresholds, counts, dataset.vocabulary)
    for r in runners: r.close()

With ``plan.bootstrap`` the IoU pass counts per block of images, ``r.iou_pass(thresholds,
plan.bootstrap.accumulator(len(dataset)))``, and ``plan.bootstrap.attach(results, counts)`` gives each layer
its intervals (``core/bootstrap.py``); ``run_passes`` does both.

One forward pass serves every layer. The reads after the activation pass (the IoU pass, and any
further read a threshold rule asks for) take the raw maps from an on-disk cache at layer resolution,
or recompute them with another forward pass where the cache would not fit (``Plan.cache``). Nothing
held in memory grows with the number of images.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from . import loading
from .cache import ActivationCache, cache_prefix, choose_cache, format_size, remove_stale_caches
from .chunks import gathered
from .diagnostics import UnitStatistics
from .errors import DissectionError
from .explain import Read
from .iou import CountsAccumulator, LabelPreparation, TallyCounts
from .partials import (
    ActivationPartial,
    CountsPartial,
    LayerAccumulator,
    LayerActivations,
    layer_results,
    merge_all,
    settle_thresholds,
)
from .protocols import Backend, BoundedThresholdRule, ConceptDataset, ThresholdRule
from .skipped import skipped_samples
from .space import check_room, disk_full_as_error, results_bytes
from .topimages import TopImagesPartial
from .types import Explanation, InputSpec, LayerResult, SkippedSample, Vocabulary

if TYPE_CHECKING:  # pragma: no cover
    from .bootstrap import BootstrapSpec

log = logging.getLogger(__name__)

#: The way out of a disk that fills with the activation cache.
CACHE_HINT = "free some space there, or pass --cache recompute (another forward pass instead of the cache)"

#: NetDissect-Lite's preprocessing: x = (RGB₀‥₂₅₅ − mean) / (255 · 0.224).
LITE_INPUT = InputSpec(mean=(124.6901 / 255, 118.6897 / 255, 109.5388 / 255), std=(0.224, 0.224, 0.224))


class Progress(Protocol):
    """Where the passes report progress (the CLI shows rich bars; the library default is silent)."""

    def start(self, name: str, total: int) -> None: ...

    def advance(self, images: int) -> None: ...

    def finish(self) -> None: ...


class SilentProgress:
    def start(self, name: str, total: int) -> None:
        log.info("%s: %d images", name, total)

    def advance(self, images: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Plan:
    """What to run: the components, the layers, and how."""

    backend: Backend
    dataset: ConceptDataset
    layers: Sequence[str]
    make_rule: Callable[[int, int], ThresholdRule]  # (units, values_per_unit) -> rule
    semantics: str = "paper"
    batch_size: int = 32
    #: Images per forward pass of the model, the loader's batches split (None: by device, see ``forward_chunk``).
    forward_chunk: int | None = None
    workers: int = field(default_factory=loading.default_workers)
    device: str = "cpu"
    top_k: int = 10
    skip_bad: bool = False
    work_dir: Path | None = None
    #: Where the reads after the activation pass get the maps: "disk" (a cache), "recompute" (another
    #: forward pass), "auto" (the disk when the cache fits ``cache_budget`` and the free space).
    cache: str = "auto"
    cache_budget: int | None = None  # bytes; None: only the free space limits the disk cache
    #: Per layer, ``(N, U, h, w) tensor -> (N, U', h, w) tensor`` applied to the backend's maps before
    #: anything else sees them (rule, top images, cache, IoU). Whoever sets one records it in the provenance.
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    #: ``(layer, units) -> accumulator`` fed every (transformed) map of the layer in the activation
    #: pass and merged across shards (``partials.LayerAccumulator``), e.g. per-unit diagnostics.
    make_diagnostics: Callable[[str, int], LayerAccumulator] | None = lambda layer, units: UnitStatistics()
    #: With a bootstrap, the IoU pass keeps its counts per block of images and each layer's result gets
    #: its intervals (``LayerResult.bootstrap``); None counts as before.
    bootstrap: BootstrapSpec | None = None
    #: ``(layer results, read) -> explanations per layer``, run after the IoU pass while the shards are
    #: still open: ``read(factory)`` is one more IoU pass counting into ``factory``'s accumulators, merged
    #: (``core.explain``). Its rows land in each ``LayerResult.explanations``.
    explain: Callable[[dict[str, LayerResult], Read], Mapping[str, Sequence[Explanation]]] | None = None
    #: The activation pass's batches of the whole dataset, their decoding already under way
    #: (``first_pass_batches``, started while the model was built); taken by the pass that reads them all.
    started: Generator[loading.Batch, None, None] | None = field(default=None, repr=False)


#: On a CPU the model runs the loader's batches this many images at a time, so that the tensors of its forward
#: pass (the bulk of a run's memory: at 224 px the output of resnet18's first convolution alone is 3.2 MB an
#: image) are those of 8 images whatever ``--batch-size`` says. Measured on 2 cores with the ``dissect``
#: command's allocator setting, 2,000 images, in alternation with whole batches of 32 (two rounds): peak RSS
#: 1,177-1,204 against 1,323-1,344 MB for resnet18 (the activation pass 5-10% slower), 1,294-1,297 against
#: 1,408-1,435 MB for vit_small_patch16_224 (about 6% slower), 1,389-1,426 against 1,862-2,193 MB for
#: convnext_tiny (as fast or faster: 117.9 and 126.9 s against 165.6 and 123.8 s). 16 at a time: between the
#: two. A GPU takes the whole batch: its throughput grows with the batch, and its memory is not the host's.
CPU_FORWARD_CHUNK = 8


def forward_chunk(plan: Plan) -> int:
    """How many images of a batch the model sees at once (``Plan.forward_chunk``, or by device)."""
    if plan.forward_chunk is not None:
        return max(1, plan.forward_chunk)
    return CPU_FORWARD_CHUNK if torch.device(plan.device).type == "cpu" else max(1, plan.batch_size)


def first_pass_batches(dataset: ConceptDataset, *, batch_size: int, workers: int, skip_bad: bool, device: str,
                       indices: Sequence[int] | np.ndarray | None = None) -> Generator[loading.Batch, None, None]:
    """The activation pass's batches; the loader's workers start decoding at once. With ``skip_bad`` the
    labels are read too: a sample whose labels cannot be read is then left out of every pass (thresholds,
    top images, counts) as if the dataset did not hold it."""
    return loading.iterate(dataset, batch_size=batch_size, workers=workers, image=True, labels=skip_bad,
                           skip_bad=skip_bad, pin_memory=device.startswith("cuda"), indices=indices)


def preprocess(images: torch.Tensor, spec: InputSpec, device: str) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` RGB → normalised float ``(N, 3, H, W)`` in the model's channel order, laid out in
    memory as ``spec.memory_format`` asks.

    The images arrive channels-last (pixel by pixel), so a channels-last batch is made without a copy: the
    arithmetic runs in place on the float batch (the same operations in the same order as out of place, so
    the same values), and only a backend that wants contiguous NCHW pays for the one reordering copy."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x.sub_(mean).div_(std)
    if spec.channel_order.upper() == "BGR":
        x = x.flip(1)
    layout = torch.channels_last if spec.memory_format == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=layout)


@contextmanager
def threads_beside(workers: int, device: str) -> Iterator[None]:
    """Torch runs this process's CPU work in ``workers`` fewer threads than it would (one at least), for a
    while: where the loader's worker processes do as much of a pass's work as this process does, they need
    those cores. Measured in the IoU pass on 2 cores (resnet18 layer4+layer3, 2,000 Broden-hard images, 2
    workers, three runs in alternation): 3.1-3.2 s in one thread against 3.7-4.5 s in two."""
    before = torch.get_num_threads()
    wanted = max(1, before - workers)
    if torch.device(device).type != "cpu" or workers <= 0 or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: ``accumulator(thresholds, vocabulary, semantics, device)``: what the IoU pass counts into.
AccumulatorFactory = Callable[[Mapping[str, np.ndarray], Vocabulary, str, str], CountsAccumulator]


class ShardRunner:
    """The passes over one shard of the dataset (``indices``; default: all of it, in order).

    Call ``activation_pass()`` first, then ``threshold_round(states)`` as often as the rules ask, then
    ``iou_pass(thresholds)``, and ``close()`` (or use it as a context manager). Between the passes it
    holds the shard's activation cache (or, where the cache would not fit, recomputes the maps), so a
    worker process can keep one runner per shard. Results are partials to merge across shards.
    """

    def __init__(self, plan: Plan, input_spec: InputSpec, indices: Sequence[int] | np.ndarray | None = None,
                 progress: Progress | None = None) -> None:
        self.plan, self.input_spec = plan, input_spec
        self.progress = progress or SilentProgress()
        total = len(plan.dataset)
        whole = indices is None
        self.indices = np.arange(total, dtype=np.int64) if whole else np.asarray(indices, dtype=np.int64).ravel()
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
            raise DissectionError(f"a shard names images outside the dataset's {total}")
        if len(np.unique(self.indices)) != len(self.indices):
            raise DissectionError("a shard names the same image twice")
        # The loader's order: the dataset's, or the shard's own.
        self._sampler = None if whole else self.indices
        self._position = np.full(total, -1, dtype=np.int64)  # dataset index -> position in the shard
        self._position[self.indices] = np.arange(len(self.indices))
        self._present = np.zeros(len(self.indices), dtype=bool)  # read by the activation pass
        self._caches: dict[str, ActivationCache] = {}
        self._bounds: dict[str, torch.Tensor] = {}  # per cached layer: below what its cache left maps out
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._cache_dir, self._cache_bytes = Path(tempfile.gettempdir()), 0  # where the cache goes, its size
        #: True when the reads after the activation pass recompute the maps (decided on its first batch).
        self.recompute = False
        self._whole_batches: bool | None = None  # whether the backend takes whole batches (asked once)

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- The passes.

    def activation_pass(self) -> ActivationPartial:
        """Read every image of the shard: each layer's rule state, top images and value count."""
        plan = self.plan
        total = len(plan.dataset)
        layers: dict[str, LayerActivations] = {}
        images = skipped = 0
        failures: list[tuple[int, str]] = []
        self.progress.start("activations", len(self.indices))
        try:
            for batch in self._first_batches():
                skipped += len(batch.failures)
                failures.extend(zip(batch.failed, batch.failures, strict=True))
                if batch.images is None:
                    self.progress.advance(len(batch.failures))
                    continue
                maps = self._maps(batch.images, plan.layers)
                positions = self._position[batch.indices]
                if not layers:
                    layers = {name: self._start_layer(name, acts, total) for name, acts in maps.items()}
                    self._open_cache(layers)
                for name, acts in maps.items():
                    layer = layers[name]
                    if tuple(acts.shape[1:]) != (layer.units, *layer.map_shape):
                        raise DissectionError(
                            f"layer {name!r}: activation maps changed shape from {(layer.units, *layer.map_shape)} "
                            f"to {tuple(acts.shape[1:])}; all images of a run must have the same size")
                    peaks = acts.amax(dim=(2, 3))  # (N, units): for the cache's choice and the top images
                    if name in self._caches:
                        keep = self._worth_keeping(name, layer.rule, peaks)
                        with disk_full_as_error(self._cache_dir, "the activation cache", self._cache_bytes, CACHE_HINT):
                            self._caches[name].write(positions, acts, keep)
                    layer.rule.update(acts)
                    layer.top_images.update(acts, batch.indices, peaks)
                    if layer.diagnostics is not None:
                        layer.diagnostics.update(acts)
                    layer.values += acts.shape[0] * acts.shape[2] * acts.shape[3]
                self._present[positions] = True
                images += len(batch.indices)
                self.progress.advance(len(batch.indices) + len(batch.failures))
        finally:
            self.progress.finish()
        return ActivationPartial(layers, images, skipped, tuple(sorted(failures)))

    def first_forward(self) -> bool:
        """One forward pass over the shard's first batch, its maps dropped: what a backend decides on its first
        batch (``--runtime auto``) is decided now, before the activation pass, which runs that batch again.
        False when none of the batch's images could be read (the activation pass says which)."""
        plan = self.plan
        first = self.indices[:plan.batch_size]
        batches = loading.iterate(plan.dataset, batch_size=plan.batch_size, workers=0, image=True, labels=False,
                                  skip_bad=True, indices=first, log_skipped=False)
        batch = next(batches, None)
        batches.close()
        if batch is None or batch.images is None:
            return False
        self._maps(batch.images, plan.layers)
        return True

    def _worth_keeping(self, name: str, rule: ThresholdRule, peaks: torch.Tensor) -> torch.Tensor | None:
        """``(N, units)``: which maps (by their ``peaks``) the cache must keep: all but those whose peak is below
        a bound the rule knows its threshold will reach (None: all). The largest bound used is kept, for
        ``_check_bounds``."""
        if not isinstance(rule, BoundedThresholdRule):
            return None
        bound = rule.lower_bound().to(peaks.device, torch.float32)
        used = self._bounds.get(name)
        self._bounds[name] = bound if used is None else torch.maximum(used, bound)
        if bool(torch.isneginf(bound).all()):  # no bound yet (or none ever, as for a radix selection)
            return None
        # "not below" rather than "at least": a NaN peak is kept.
        return torch.lt(peaks, bound).logical_not_()

    def _check_bounds(self, thresholds: Mapping[str, np.ndarray]) -> None:
        """Each cached layer's thresholds reach the bounds its cache left maps out below (so every map left out
        is -inf for the counts without changing them)."""
        for name, bound in self._bounds.items():
            if name in thresholds and name in self._caches:
                below = torch.from_numpy(np.asarray(thresholds[name], dtype=np.float64)) < bound.double().cpu()
                if bool(below.any()):
                    units = below.nonzero().flatten().tolist()[:5]
                    raise RuntimeError(f"layer {name!r}: the thresholds of units {units} fell below the bound their "
                                       "threshold rule gave while the cache was written")

    def threshold_round(self, states: Mapping[str, ThresholdRule]) -> dict[str, ThresholdRule]:
        """One more read of every map of the layers in ``states``: each state (copied, never changed)
        updated with this shard's maps, for the driver to merge across shards."""
        updated = {name: copy.deepcopy(state) for name, state in states.items()}
        if not updated:
            return updated
        for name in updated:
            bound = self._bounds.get(name)
            if not self.recompute and bound is not None and bool(torch.isfinite(bound).any()):
                raise RuntimeError(f"layer {name!r}: its threshold rule asks to read every map again after giving a "
                                   "lower bound, below which the cache left maps out; a rule that reads again must "
                                   "give -inf bounds")
        present = np.flatnonzero(self._present)
        self.progress.start("thresholds", len(present))
        try:
            if self.recompute:
                for batch, _kept, maps in self._recomputed(list(updated), labels=False):
                    for name, state in updated.items():
                        state.update(maps[name])
                    self.progress.advance(len(batch.indices) + len(batch.failures))
            else:
                for start in range(0, len(present), self.plan.batch_size):
                    positions = present[start:start + self.plan.batch_size]
                    for name, state in updated.items():
                        state.update(self._caches[name].read(positions).to(self.plan.device))
                    self.progress.advance(len(positions))
        finally:
            self.progress.finish()
        return updated

    def iou_pass(self, thresholds: Mapping[str, np.ndarray],
                 accumulator: AccumulatorFactory = TallyCounts, stage: str = "IoU") -> CountsPartial:
        """Count I, G, A for every layer of ``thresholds`` over the shard's images (into the
        ``accumulator`` the factory builds; by default sums over the shard) and return its partial.
        ``stage`` names the read in the progress bars."""
        plan = self.plan
        vocabulary = plan.dataset.vocabulary
        if not self.recompute:
            self._check_bounds(thresholds)
            for name, cache in self._caches.items():
                log.debug("activation cache of %s: %d of %d maps written, %s", name, cache.maps_written,
                          cache.maps_seen, format_size(cache.size))
        counts = accumulator(thresholds, vocabulary, plan.semantics, plan.device)
        # The loader's workers prepare each batch's labels (label sets included) beside this process's counting.
        prepare = LabelPreparation(vocabulary.primary_category_index(), len(vocabulary.categories), plan.semantics,
                                   keep_layers=getattr(counts, "needs_label_layers", True))
        layers = list(thresholds)
        self.progress.start(stage, len(self.indices))
        try:
            batches: Iterator[tuple[loading.Batch, np.ndarray, dict[str, torch.Tensor] | None]]
            batches = self._recomputed(layers, labels=True, prepare=prepare) if self.recompute else \
                self._cached_with_labels(prepare)
            # Read from the cache, the batches' labels are the pass's critical path, prepared by the loader's
            # workers: the counting here leaves them their cores (see ``threads_beside``). Recomputed, the
            # forward pass needs every thread.
            with threads_beside(0 if self.recompute else plan.workers, plan.device):
                for batch, kept, maps in batches:
                    assert batch.prepared is not None
                    indices = batch.indices[kept]
                    labels, truth = batch.prepared
                    if not kept.all():  # some images were not read by the activation pass: the others' labels
                        labels, truth = labels.rows(torch.from_numpy(kept))
                    labels = labels.to(plan.device, non_blocking=True)
                    counts.add_truth(indices, truth)
                    positions = self._position[indices]
                    for name in layers:
                        acts = maps[name] if maps is not None else \
                            self._caches[name].read(positions).to(plan.device, non_blocking=True)
                        counts.add(name, indices, acts, labels)
                    self.progress.advance(len(batch.indices) + len(batch.failures))
        finally:
            self.progress.finish()
        return counts.partial()

    def close(self) -> None:
        """Delete the shard's activation cache."""
        for cache in self._caches.values():
            cache.close()
        self._caches = {}
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    # ---- Helpers.

    def _batches(self, *, image: bool, labels: bool, later: bool = False,
                 prepare: loading.Prepare | None = None) -> Iterator[loading.Batch]:
        """The shard's batches; ``later``: a pass after the activation pass, which skips only the samples
        that pass skipped (a sample it read that fails now means the dataset changed during the run).
        ``prepare``: label work done in the loader's worker processes (``Batch.prepared``)."""
        plan = self.plan
        batches = loading.iterate(plan.dataset, batch_size=plan.batch_size, workers=plan.workers, image=image,
                                  labels=labels, skip_bad=plan.skip_bad, pin_memory=plan.device.startswith("cuda"),
                                  indices=self._sampler, log_skipped=not later, prepare=prepare)
        if not later:
            return batches
        return self._read_before(batches)

    def _first_batches(self) -> Iterator[loading.Batch]:
        """The activation pass's batches: those the plan started, when this runner reads the whole dataset."""
        plan = self.plan
        started, plan.started = plan.started, None
        if started is not None and self._sampler is None:
            return started
        if started is not None:
            started.close()  # its workers stop
        return first_pass_batches(plan.dataset, batch_size=plan.batch_size, workers=plan.workers,
                                  skip_bad=plan.skip_bad, device=plan.device, indices=self._sampler)

    def _read_before(self, batches: Iterator[loading.Batch]) -> Iterator[loading.Batch]:
        for batch in batches:
            for index, message in zip(batch.failed, batch.failures, strict=True):
                if self._present[self._position[index]]:
                    raise DissectionError(f"{message}, though the first pass read it: the dataset changed "
                                          "during the run; run it again")
            yield batch

    def _maps(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """One forward pass: each layer's float maps ``(N, U, h, w)``, transformed where the plan says. The
        model sees the batch ``forward_chunk(plan)`` images at a time (see ``CPU_FORWARD_CHUNK``); the chunks'
        maps are written into one batch of maps. A backend that takes whole batches chunks them itself (its late
        layers may then run the whole batch at once)."""
        chunk = forward_chunk(self.plan)
        if len(images) <= chunk or self._takes_whole_batches(chunk):
            return self._chunk_maps(images, layers)
        parts = (self._chunk_maps(images[start:start + chunk], layers) for start in range(0, len(images), chunk))
        return gathered(parts, len(images))

    def _takes_whole_batches(self, chunk: int) -> bool:
        """Whether the backend bounds its forward pass's memory to ``chunk`` images itself and so takes whole
        batches (``Backend.take_whole_batches``, optional; asked once)."""
        if self._whole_batches is None:
            take = getattr(self.plan.backend, "take_whole_batches", None)
            self._whole_batches = callable(take) and bool(take(self.plan.batch_size, chunk))
        return self._whole_batches

    def _chunk_maps(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        plan = self.plan
        x = preprocess(images, self.input_spec, plan.device)
        maps = {}
        with torch.inference_mode():
            outputs = plan.backend.activations(x, list(layers))
            for name in layers:
                acts = torch.as_tensor(outputs[name])
                if acts.ndim != 4:
                    raise DissectionError(
                        f"layer {name!r} gives output of shape {tuple(acts.shape)}, not a spatial map "
                        "(N, units, h, w); pick a convolutional or token layer (see: dissect layers MODEL)")
                transform = plan.transforms.get(name)
                if transform is not None:
                    acts = torch.as_tensor(transform(acts.float()))
                    if acts.ndim != 4:
                        raise DissectionError(f"the transform of layer {name!r} gives shape {tuple(acts.shape)}, "
                                              "not (N, units, h, w)")
                maps[name] = acts.float()
        return maps

    def _start_layer(self, name: str, acts: torch.Tensor, total: int) -> LayerActivations:
        units, h, w = (int(v) for v in acts.shape[1:])
        plan = self.plan
        diagnostics = plan.make_diagnostics(name, units) if plan.make_diagnostics is not None else None
        # The rule is sized for the whole dataset, whatever the shard: every shard's state is alike.
        return LayerActivations(name, units, (h, w), 0, plan.make_rule(units, total * h * w),
                                TopImagesPartial.empty(units, plan.top_k, (h, w)), diagnostics)

    def _open_cache(self, layers: Mapping[str, LayerActivations]) -> None:
        plan = self.plan
        # At most: every map and the bitmask of the units kept; usually about half.
        record = sum(ActivationCache.most_record_bytes(layer.units, *layer.map_shape) for layer in layers.values())
        folder = plan.work_dir if plan.work_dir is not None else Path(tempfile.gettempdir())
        # What the results will take where the run writes them: refused now, not after the passes.
        vocabulary = plan.dataset.vocabulary
        results = 0 if plan.work_dir is None else results_bytes(
            [(layer.units, *layer.map_shape) for layer in layers.values()], vocabulary.size,
            len(vocabulary.categories), plan.top_k)
        if results:
            check_room(folder, results, "the results")
        self._cache_dir, self._cache_bytes = folder, record * len(self.indices)
        disk, reason = choose_cache(plan.cache, self._cache_bytes, folder, plan.cache_budget, reserve=results)
        self.recompute = not disk
        if not disk:
            if plan.cache == "auto":
                log.info("%s: the maps are recomputed (another forward pass) for the later reads", reason)
            return
        log.debug("activation cache: %s", reason)
        remove_stale_caches(plan.work_dir)
        self._folder = tempfile.TemporaryDirectory(prefix=cache_prefix(), dir=plan.work_dir)
        for i, name in enumerate(layers):
            self._caches[name] = ActivationCache(Path(self._folder.name) / f"layer{i}.f32", len(self.indices))

    def _cached_with_labels(self, prepare: loading.Prepare | None = None
                            ) -> Iterator[tuple[loading.Batch, np.ndarray, None]]:
        """The labels of the images the activation pass read (the maps come from the cache)."""
        for batch in self._batches(image=False, labels=True, later=True, prepare=prepare):
            kept = self._present[self._position[batch.indices]]
            if batch.prepared is None or not kept.any():
                self.progress.advance(len(batch.indices) + len(batch.failures))
                continue
            yield batch, kept, None

    def _recomputed(self, layers: Sequence[str], *, labels: bool, prepare: loading.Prepare | None = None
                    ) -> Iterator[tuple[loading.Batch, np.ndarray, dict[str, torch.Tensor]]]:
        """Another forward pass, in the activation pass's batches: the maps of the images it read."""
        for batch in self._batches(image=True, labels=labels, later=True, prepare=prepare):
            kept = self._present[self._position[batch.indices]]
            if batch.images is None or not kept.any():
                self.progress.advance(len(batch.indices) + len(batch.failures))
                continue
            maps = self._maps(batch.images, layers)
            if not kept.all():
                rows = torch.from_numpy(kept)
                maps = {name: acts[rows.to(acts.device)] for name, acts in maps.items()}
            yield batch, kept, maps


def run_passes(plan: Plan, input_spec: InputSpec, progress: Progress | None = None,
               shards: Sequence[Sequence[int] | np.ndarray] | None = None,
               skipped: list[SkippedSample] | None = None) -> tuple[dict[str, LayerResult], int, dict[str, float]]:
    """Run the passes for every layer of the plan in this process, over the whole dataset or over
    ``shards`` (which must cover every image once) merged; return the per-layer results, the number of
    images counted, and the seconds spent per pass. The samples skipped (``plan.skip_bad``) are added to
    ``skipped`` when it is given."""
    dataset = plan.dataset
    total = len(dataset)
    if total == 0:
        raise DissectionError("the concept dataset has no images")
    if shards is not None:
        covered = np.sort(np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in shards]))
        if not np.array_equal(covered, np.arange(total)):
            raise DissectionError(f"the shards must cover each of the dataset's {total} images once")
    runners = [ShardRunner(plan, input_spec, s, progress) for s in (shards or [None])]
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        activations = merge_all(runner.activation_pass() for runner in runners)
        seconds["activations"] = time.perf_counter() - start
        if skipped is not None:
            skipped.extend(skipped_samples(dataset, activations.failures))
        if activations.images == 0:
            raise DissectionError("no image of the concept dataset could be loaded")

        start = time.perf_counter()
        thresholds = settle_thresholds(activations, lambda states: [r.threshold_round(states) for r in runners])
        seconds["thresholds"] = time.perf_counter() - start

        start = time.perf_counter()
        accumulator = plan.bootstrap.accumulator(total) if plan.bootstrap is not None else TallyCounts
        counts = merge_all(runner.iou_pass(thresholds, accumulator) for runner in runners)
        seconds["iou"] = time.perf_counter() - start
        results = layer_results(activations, thresholds, counts, dataset.vocabulary)

        if plan.explain is not None:
            start = time.perf_counter()

            def read(factory: AccumulatorFactory, stage: str = "explain") -> CountsPartial:
                return merge_all(r.iou_pass(thresholds, accumulator=factory, stage=stage) for r in runners)

            for name, rows in plan.explain(results, read).items():
                results[name].explanations = list(rows)
            seconds["explain"] = time.perf_counter() - start
    finally:
        for runner in runners:
            runner.close()
    if plan.bootstrap is not None:
        start = time.perf_counter()
        plan.bootstrap.attach(results, counts)
        seconds["bootstrap"] = time.perf_counter() - start
    for name, result in results.items():
        for warning in result.warnings:
            log.warning("layer %s: %s", name, warning)
    return results, counts.images, seconds
