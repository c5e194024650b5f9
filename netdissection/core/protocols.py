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
    """Streaming per-unit thresholds: ``update`` with every batch of raw activations, then ``finish``."""

    def update(self, activations: torch.Tensor) -> None:
        """Take a batch ``(N, units, h, w)`` of raw (not upsampled) activations."""
        ...

    def finish(self) -> np.ndarray:
        """One float64 threshold per unit."""
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
