"""What the passes over one shard of the dataset return, and how shards merge: exactly.

A shard is any subset of the dataset's indices. Its activation pass returns, per layer, the threshold
rule's state, the top images and the number of values read (``ActivationPartial``); once the
thresholds are known, its IoU pass returns the counts I, G, A (``CountsPartial``). Rule states merge
by the rule's own ``merge``, top images by keeping the k best in a total order, counts by addition:
so thresholds and tallies from any split of the dataset equal one process's, bit for bit, whenever
the backend gives each image the same maps whichever batch it is in (``split_shards`` keeps every
batch of the one-process run whole, so that holds for any backend).

Every partial is a plain dataclass of arrays, tensors and rule states: it pickles, so an executor can
run shards in other processes or on other machines and merge their partials here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, Protocol, TypeVar

import numpy as np

from .errors import DissectionError
from .protocols import ThresholdRule
from .topimages import TopImagesPartial
from .types import LayerResult, Vocabulary


class LayerAccumulator(Protocol):
    """Something that sees every raw map of a layer in the activation pass and merges across shards
    (e.g. per-unit diagnostics): ``update`` with each batch ``(N, U, h, w)``, ``merge`` another shard's."""

    def update(self, activations: Any) -> None: ...

    def merge(self, other: Any) -> Any: ...


@dataclass
class LayerActivations:
    """One layer's share of a shard's activation pass."""

    layer: str
    units: int
    map_shape: tuple[int, int]
    values: int  # values per unit read: images × h × w
    rule: ThresholdRule  # the rule's state after this read
    top_images: TopImagesPartial
    #: The plan's per-layer accumulator (``Plan.make_diagnostics``), if any: merged with its ``merge``.
    diagnostics: LayerAccumulator | None = None

    def merge(self, other: LayerActivations) -> LayerActivations:
        if (other.units, other.map_shape) != (self.units, self.map_shape):
            raise DissectionError(f"layer {self.layer!r} gives maps of {self.units}×{self.map_shape} in one shard "
                                  f"and {other.units}×{other.map_shape} in another; all images of a run must "
                                  "have the same size")
        diagnostics = self.diagnostics
        if diagnostics is not None and other.diagnostics is not None:
            diagnostics = diagnostics.merge(other.diagnostics)
        return LayerActivations(self.layer, self.units, self.map_shape, self.values + other.values,
                                merge_rules([self.rule, other.rule]), self.top_images.merge(other.top_images),
                                diagnostics)


@dataclass
class ActivationPartial:
    """A shard's activation pass: per layer (in the plan's order) what it read, and its images."""

    layers: dict[str, LayerActivations]
    images: int  # images read
    skipped: int = 0  # images that could not be loaded (skipped with --skip-bad)
    #: ``(dataset position, message)`` of each skipped sample, by position.
    failures: tuple[tuple[int, str], ...] = ()

    def merge(self, other: ActivationPartial) -> ActivationPartial:
        """Both shards' layers; a shard that read no image has none and adds nothing."""
        layers = dict(self.layers)
        for name, layer in other.layers.items():
            layers[name] = layers[name].merge(layer) if name in layers else layer
        return ActivationPartial(layers, self.images + other.images, self.skipped + other.skipped,
                                 tuple(sorted(self.failures + other.failures)))


@dataclass
class LayerCounts:
    """One layer's IoU counts: I[u, l] ``(U, L)`` and A[u, c] ``(U, C)``, int64."""

    intersection: np.ndarray
    activation: np.ndarray

    def merge(self, other: LayerCounts) -> LayerCounts:
        return LayerCounts(self.intersection + other.intersection, self.activation + other.activation)


@dataclass
class CountsPartial:
    """A shard's IoU pass: per layer its counts, the truth counts G[l] ``(L,)`` and the images counted."""

    layers: dict[str, LayerCounts]
    truth: np.ndarray
    images: int

    def merge(self, other: CountsPartial) -> CountsPartial:
        layers = {name: counts.merge(other.layers[name]) for name, counts in self.layers.items()}
        return CountsPartial(layers, self.truth + other.truth, self.images + other.images)


Part = TypeVar("Part", ActivationPartial, CountsPartial, LayerActivations, LayerCounts)


def merge_all(parts: Iterable[Part]) -> Part:
    """Merge the partials of every shard (in any order: the result is the same)."""
    return reduce(lambda a, b: a.merge(b), parts)


def merge_rules(states: Sequence[ThresholdRule]) -> ThresholdRule:
    """One rule state from the states of every shard after the same read."""
    if len(states) == 1:
        return states[0]
    merged = states[0]
    if not callable(getattr(merged, "merge", None)):
        raise DissectionError(f"the threshold rule {type(merged).__name__} cannot run on a dataset split into "
                              "shards: it has no merge(other); run it in one process")
    for other in states[1:]:
        merged = merged.merge(other)  # type: ignore[attr-defined]
    return merged


def next_rounds(states: Mapping[str, ThresholdRule]) -> dict[str, ThresholdRule]:
    """The layers whose rule wants another read of every map, with the state each shard starts from."""
    pending = {}
    for name, state in states.items():
        ask = getattr(state, "next_round", None)
        following = ask() if callable(ask) else None
        if following is not None:
            pending[name] = following
    return pending


#: ``read(states)``: every shard's states after one more read of every map, fed from ``states`` (which
#: a shard must not change: it works on its own copies), e.g. ``[r.threshold_round(states) for r in runners]``.
ReadAll = Callable[[dict[str, ThresholdRule]], list[dict[str, ThresholdRule]]]


def settle_thresholds(partial: ActivationPartial, read: ReadAll) -> dict[str, np.ndarray]:
    """The thresholds of every layer from the merged activation pass: more reads while a rule asks for
    them (all such layers in the same read), each read merged across the shards before the next."""
    states = {name: layer.rule for name, layer in partial.layers.items()}
    pending = next_rounds(states)
    while pending:
        shards = read(pending)
        merged = {name: merge_rules([shard[name] for shard in shards]) for name in pending}
        states.update(merged)
        pending = next_rounds(merged)
    return {name: np.asarray(rule.finish(), dtype=np.float64) for name, rule in states.items()}


def layer_results(activations: ActivationPartial, thresholds: Mapping[str, np.ndarray], counts: CountsPartial,
                  vocabulary: Vocabulary) -> dict[str, LayerResult]:
    """The per-layer results of a run from its merged partials."""
    from .diagnostics import UnitStatistics, layer_warnings

    results = {}
    for name, layer in activations.layers.items():
        layer_counts = counts.layers[name]
        # The layer's own statistics (merged over the shards) say whether its maps are degenerate.
        warnings = layer_warnings(layer.diagnostics.result(), thresholds[name], layer_counts.activation) \
            if isinstance(layer.diagnostics, UnitStatistics) else []
        results[name] = LayerResult(
            layer=name,
            vocabulary=vocabulary,
            thresholds=thresholds[name],
            intersection=layer_counts.intersection,
            truth=counts.truth.copy(),
            activation=layer_counts.activation,
            top_images=layer.top_images.result(),
            map_shape=(layer.units, *layer.map_shape),
            warnings=warnings,
        )
    return results


def split_shards(images: int, shards: int, batch_size: int) -> list[np.ndarray]:
    """Split ``range(images)`` into ``shards`` runs of consecutive indices made of whole batches of the
    one-process run, as even as whole batches allow (trailing shards may be empty)."""
    if shards < 1:
        raise DissectionError(f"the number of shards must be at least 1, not {shards}")
    batches = math.ceil(images / batch_size)
    bounds = [min(images, batches * i // shards * batch_size) for i in range(shards + 1)]
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(shards)]
