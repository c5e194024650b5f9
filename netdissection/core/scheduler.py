"""The scheduler: for every requested layer at once, the activation pass, the thresholds, the IoU pass.

One forward pass of the model serves every layer. Raw maps go to an on-disk cache at layer
resolution; thresholds come from a streaming rule; the IoU pass then reads the cache with the
labels. Nothing held in memory grows with the number of images except the per-unit top-k buffers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import loading
from .cache import ActivationCache, cache_prefix, remove_stale_caches
from .diagnostics import UnitStatistics, layer_warnings
from .errors import DissectionError
from .iou import IoUAccumulator, prepare_labels
from .protocols import Backend, ConceptDataset, ThresholdRule
from .topimages import TopImagesTracker
from .types import InputSpec, LayerResult

log = logging.getLogger(__name__)

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
    workers: int = field(default_factory=loading.default_workers)
    device: str = "cpu"
    top_k: int = 10
    skip_bad: bool = False
    work_dir: Path | None = None


def preprocess(images: torch.Tensor, spec: InputSpec, device: str) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` RGB → normalised float ``(N, 3, H, W)`` in the model's channel order."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if spec.channel_order.upper() == "BGR":
        x = x.flip(1)
    return x.contiguous()


@dataclass
class _LayerState:
    name: str
    rule: ThresholdRule | None = None
    cache: ActivationCache | None = None
    top: TopImagesTracker | None = None
    units: int = 0
    stats: UnitStatistics = field(default_factory=UnitStatistics)


def run_passes(plan: Plan, input_spec: InputSpec, progress: Progress | None = None) -> tuple[
        dict[str, LayerResult], int, dict[str, float]]:
    """Run both passes for every layer of the plan; return the per-layer results, the number of images
    counted, and the seconds spent per pass."""
    progress = progress or SilentProgress()
    dataset = plan.dataset
    total = len(dataset)
    if total == 0:
        raise DissectionError("the concept dataset has no images")
    vocab = dataset.vocabulary
    category_of = torch.from_numpy(vocab.primary_category_index())
    categories = len(vocab.categories)
    seconds: dict[str, float] = {}
    states = {name: _LayerState(name) for name in plan.layers}

    remove_stale_caches(plan.work_dir)
    with tempfile.TemporaryDirectory(prefix=cache_prefix(), dir=plan.work_dir) as tmp:
        # ---- Pass 1: activations → thresholds (streaming), top images, cache.
        start = time.perf_counter()
        progress.start("activations", total)
        seen = 0
        try:
            for batch in loading.iterate(dataset, batch_size=plan.batch_size, workers=plan.workers,
                                         image=True, labels=False, skip_bad=plan.skip_bad,
                                         pin_memory=plan.device.startswith("cuda")):
                if batch.images is None:
                    progress.advance(len(batch.failures))
                    continue
                x = preprocess(batch.images, input_spec, plan.device)
                with torch.inference_mode():
                    outputs = plan.backend.activations(x, list(plan.layers))
                for name, state in states.items():
                    acts = torch.as_tensor(outputs[name])
                    if acts.ndim != 4:
                        raise DissectionError(
                            f"layer {name!r} gives output of shape {tuple(acts.shape)}, not a spatial map "
                            "(N, units, h, w); pick a convolutional or token layer (see: dissect layers MODEL)")
                    acts = acts.float()
                    if state.rule is None:
                        state.units = acts.shape[1]
                        values = total * acts.shape[2] * acts.shape[3]
                        state.rule = plan.make_rule(state.units, values)
                        state.cache = ActivationCache(Path(tmp) / f"layer{list(states).index(name)}.f32", total)
                        state.top = TopImagesTracker(state.units, plan.top_k)
                    assert state.cache is not None and state.top is not None
                    try:
                        state.cache.write(batch.indices, acts)
                    except ValueError as exc:
                        raise DissectionError(
                            f"layer {name!r}: {exc}; all images of a run must have the same size") from None
                    state.rule.update(acts)
                    state.top.update(acts, batch.indices)
                    state.stats.update(acts)
                seen += len(batch.indices)
                progress.advance(len(batch.indices) + len(batch.failures))
        finally:
            progress.finish()
        seconds["activations"] = time.perf_counter() - start
        if seen == 0:
            raise DissectionError("no image of the concept dataset could be loaded")

        # ---- Thresholds.
        start = time.perf_counter()
        thresholds = {name: s.rule.finish() for name, s in states.items() if s.rule is not None}
        seconds["thresholds"] = time.perf_counter() - start

        # ---- Pass 2: IoU counts against the labels.
        start = time.perf_counter()
        accumulators = {
            name: IoUAccumulator(torch.from_numpy(t).to(plan.device), category_of, categories, plan.semantics)
            for name, t in thresholds.items()
        }
        truth = torch.zeros(category_of.shape[0], dtype=torch.int64)
        counted = 0
        progress.start("IoU", total)
        try:
            for batch in loading.iterate(dataset, batch_size=plan.batch_size, workers=plan.workers,
                                         image=False, labels=True, skip_bad=plan.skip_bad):
                present = states[plan.layers[0]].cache.present[batch.indices] if len(batch.indices) else []
                keep = np.asarray(present, dtype=bool)
                if batch.layers is None or not keep.any():
                    progress.advance(len(batch.indices) + len(batch.failures))
                    continue
                indices = batch.indices[keep]
                labels, batch_truth = prepare_labels(
                    batch.layers[torch.from_numpy(keep)].to(plan.device),
                    batch.image_labels[torch.from_numpy(keep)].to(plan.device),
                    category_of.to(plan.device), categories, plan.semantics)
                truth += batch_truth.cpu()
                for name, acc in accumulators.items():
                    cache = states[name].cache
                    assert cache is not None
                    acc.add(cache.read(indices).to(plan.device), labels)
                counted += len(indices)
                progress.advance(len(batch.indices) + len(batch.failures))
        finally:
            progress.finish()
            for state in states.values():
                if state.cache is not None:
                    state.cache.close()
        seconds["iou"] = time.perf_counter() - start

    results = {}
    for name, acc in accumulators.items():
        intersection, activation = acc.counts()
        state = states[name]
        assert state.top is not None
        stats = state.stats.result()
        results[name] = LayerResult(
            layer=name,
            vocabulary=vocab,
            thresholds=thresholds[name],
            intersection=intersection.numpy(),
            truth=truth.numpy().copy(),
            activation=activation.numpy(),
            top_images=state.top.result(),
            map_shape=stats.map_shape,
            warnings=layer_warnings(stats, thresholds[name], activation.numpy()),
        )
        for warning in results[name].warnings:
            log.warning("layer %s: %s", name, warning)
        log.debug("%s: upsampled %d of %d (image, unit) pairs", name, acc.pairs_upsampled, acc.pairs_seen)
    return results, counted, seconds
