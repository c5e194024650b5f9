"""The component contracts plugins implement. Plain protocols: no base class to inherit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .types import BackendOptions, InputSpec, LayerInfo, RunResult, Sample, Vocabulary

if TYPE_CHECKING:  # annotations only: the contracts must not import a framework
    import numpy as np
    import torch


@runtime_checkable
class Backend(Protocol):
    """A model behind a framework. All requested layers come out of ONE forward pass.

    Optional: ``select_layers(requested) -> list[str]`` checks the requested layer names (one-line errors that
    can say more than "unknown") and, given None, returns the default layer; without it the host takes the
    last layer with a spatial map. A ``LayerInfo`` may name the ``module`` an alias resolves to (``stage:-1``
    → ``stages.3``): results record it and name the layer's folder after it.

    Optional: ``runtimes``, the names ``--runtime`` may give it (``BackendOptions.runtime``; e.g. torch,
    onnxruntime, auto). A backend without it runs on its own runtime and ``--runtime`` is refused for it.
    ``describe()`` is asked again after the passes: a backend may record there what it decided while it ran
    (the runtime ``auto`` chose). With ``runtimes``, optional too: ``adopt_runtime(decided, by)``, which runs
    ``auto`` on what another process decided (``decided``: the ``runtime`` and ``runtime_seconds_per_batch``
    of that backend's ``describe()``; ``by``: where, recorded) instead of deciding here: a sharded run decides
    once, on its first shard, so that every shard's maps have the same float rounding.

    Optional: ``take_whole_batches(batch, chunk) -> bool``, asked once per run on a device where the scheduler
    would split each batch (a CPU: ``chunk`` images at a time, to bound the forward pass's memory). A backend
    that answers True is then given whole batches of up to ``batch`` images and bounds its memory itself, to that
    of ``chunk`` images in its largest layers: free to run its later, smaller layers on the whole batch (the
    torch backends do where that computes the same maps). Without it, or False: chunks.

    Optional: ``release()``, called once ``netdissection.dissect`` is done with the backend (whatever the
    outcome): undo what the run did to a model the caller keeps (the torch backends unfold its batch norms and
    give each module its mode back).
    """

    def layers(self) -> list[LayerInfo]:
        """Every layer that can be dissected, in execution order, with its shape for the default input."""
        ...

    def input_spec(self) -> InputSpec:
        """Size hint, mean/std and channel order the model expects."""
        ...

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run one forward pass on normalised ``(N, 3, H, W)`` images; ``(N, units, h, w)`` per layer."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance: model reference, weights file and hash, framework versions."""
        ...


@runtime_checkable
class ConceptDataset(Protocol):
    """A densely labelled concept set. Must be picklable: samples load in worker processes."""

    vocabulary: Vocabulary

    def __len__(self) -> int: ...

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Sample:
        """Load one sample; skip decoding what is not asked for (each pass needs only one part)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance: where the data is, its format and size."""
        ...


@runtime_checkable
class ThresholdRule(Protocol):
    """Streaming per-unit thresholds: ``update`` with every batch of raw activations, then ``finish``.

    That is the whole contract for a rule that runs in one process. Two optional methods, checked
    with ``hasattr`` (see ``MergeableThresholdRule`` and ``MultiRoundThresholdRule``), let a rule run
    on a dataset split into shards and read every map more than once. The scheduler drives them so::

        state = merge(each shard's rule after the activation pass)   # merge only with several shards
        while (following := state.next_round()) is not None:         # absent: no further read
            state = merge(each shard's copy of ``following``, after an update with every raw map)
        thresholds = state.finish()

    The images reach ``update`` in batches of any size and in any order, so a rule's answer must not
    depend on either. A state travels between processes: keep it picklable (tensors and arrays).
    """

    def update(self, activations: torch.Tensor) -> None:
        """Take a batch ``(N, units, h, w)`` of raw (not upsampled) activations."""
        ...

    def finish(self) -> np.ndarray:
        """One float64 threshold per unit."""
        ...


@runtime_checkable
class MergeableThresholdRule(ThresholdRule, Protocol):
    """A rule whose state can be computed per shard of the dataset and combined."""

    def merge(self, other: Any) -> Any:
        """Combine ``other``, the state of the same rule (same factory and parameters) after the same
        read of another shard, into this one, and return the combined state (``self`` may be reused).
        Merging must be exact and independent of the order: merging the shards of a dataset gives the
        state one process reading the whole dataset would have."""
        ...


@runtime_checkable
class MultiRoundThresholdRule(ThresholdRule, Protocol):
    """A rule that may need to read every raw map again before it can finish (e.g. an exact selection
    that narrows a bracket at every read, keeping its memory bounded)."""

    def next_round(self) -> Any:
        """Called once a read of every map is complete (and merged across shards). Return None when
        ``finish`` can answer; otherwise a state for one more read: a rule whose ``update`` takes every
        raw map again, carrying what the reads so far found but none of their counts. Each shard feeds
        its own copy of it; the copies are merged; ``next_round`` is asked again."""
        ...


@runtime_checkable
class BoundedThresholdRule(ThresholdRule, Protocol):
    """A rule that knows, while it reads, a value each unit's final threshold will not be below: the
    activation cache then keeps no map of an image whose peak is below it (such a map can hold no mask pixel,
    as an upsampled value never exceeds its map's peak), and the IoU pass reads those maps as -inf."""

    def lower_bound(self) -> torch.Tensor:
        """``(units,)`` float32, on any device: for each unit a value its threshold, once finished, will be at
        least (``-inf`` where nothing is known yet). Valid at any time and for any shard: a shard's rule
        knows a bound for the whole dataset's threshold. A rule that will ask to read every map again
        (``next_round``) must give -inf: those reads take the maps from the same cache."""
        ...


#: ``factory(units, values_per_unit, **params) -> ThresholdRule``; ``values_per_unit`` is the number
#: of activation values each unit will see over the whole dataset (rules that keep a top-k need it).
ThresholdFactory = Callable[..., ThresholdRule]

#: ``factory(model_ref, options) -> Backend``.
BackendFactory = Callable[[Any, BackendOptions], Backend]

#: ``factory(path, categories=None, **options) -> ConceptDataset``.
DatasetFactory = Callable[..., ConceptDataset]


@runtime_checkable
class ReportWriter(Protocol):
    """Writes files from a finished run; returns the paths it wrote."""

    def write(self, result: RunResult, out_dir: Path) -> list[Path]: ...
