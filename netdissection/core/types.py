"""Plain data the host and the plugins exchange: concepts, samples, layers, results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .bootstrap import LayerBootstrap

#: The six Broden categories, in Broden's ``category.csv`` order.
BRODEN_CATEGORIES = ("object", "part", "scene", "material", "texture", "color")

#: A unit is a detector when its best IoU reaches this (the report rule).
DETECTOR_IOU = 0.04


@dataclass(frozen=True)
class Concept:
    """One concept of a dataset: its global label number, name and categories.

    ``category`` is the primary category (the one with the largest coverage); ``categories``
    lists every category the label occurs in, in the dataset's category order.
    """

    number: int
    name: str
    category: str
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vocabulary:
    """The concepts of a dataset and its (selected) categories, in report order."""

    categories: tuple[str, ...]
    concepts: tuple[Concept, ...]

    def __post_init__(self) -> None:
        numbers = [c.number for c in self.concepts]
        if len(set(numbers)) != len(numbers):
            raise ValueError("concept numbers must be unique")
        if any(n <= 0 for n in numbers):
            raise ValueError("concept numbers start at 1; 0 means unlabelled")
        unknown = {c.category for c in self.concepts} - set(self.categories)
        if unknown:
            raise ValueError(f"concepts name categories not in the vocabulary: {sorted(unknown)}")

    @property
    def size(self) -> int:
        """One more than the largest label number: the length of per-label arrays (index = number)."""
        return 1 + max((c.number for c in self.concepts), default=0)

    def names(self) -> list[str]:
        """Name per label number ('' for numbers that are not concepts)."""
        names = [""] * self.size
        for c in self.concepts:
            names[c.number] = c.name
        return names

    def primary_category_index(self) -> np.ndarray:
        """Index into ``categories`` of each label number's primary category; -1 for non-concepts."""
        index = np.full(self.size, -1, dtype=np.int64)
        position = {name: i for i, name in enumerate(self.categories)}
        for c in self.concepts:
            index[c.number] = position[c.category]
        return index

    def by_number(self) -> dict[int, Concept]:
        return {c.number: c for c in self.concepts}


def select_categories(available: Sequence[str], requested: Sequence[str] | None) -> tuple[str, ...]:
    """The requested categories in the dataset's own order (all of them when none are requested); an
    unknown name fails with close matches."""
    from .errors import UnknownNameError

    if not requested:
        return tuple(available)
    for name in requested:
        if name not in available:
            raise UnknownNameError("category", name, available)
    return tuple(c for c in available if c in requested)


@dataclass
class Sample:
    """One image of a concept dataset with its labels, as the scheduler consumes it.

    ``image`` is RGB uint8 ``(H, W, 3)`` at its stored size. ``layers`` holds every pixel label
    layer of the selected categories, ``(K, sh, sw)`` global label numbers (0 = unlabelled; K may
    be 0). ``image_labels`` are image-level labels (scene, texture) that cover every pixel.
    Either part may be ``None`` when the caller asked only for the other.
    """

    index: int
    image: np.ndarray | None
    layers: np.ndarray | None
    image_labels: tuple[int, ...]
    label_shape: tuple[int, int]


#: Layer kinds whose output is a map of units over image positions.
SPATIAL_KINDS = ("conv", "tokens", "channels_last")


@dataclass(frozen=True)
class LayerInfo:
    """A layer a backend can dissect. ``shape`` is ``(channels, h, w)`` for spatial maps.

    ``module`` names what an alias such as ``stage:-1`` resolves to (None: the name is the module itself);
    ``note`` says what a layer that is no map holds, for the error that refuses it.
    """

    name: str
    kind: str  # "conv" (N, C, h, w), "tokens" (reshaped to a grid), "channels_last", "attention" or "vector"
    shape: tuple[int, ...]
    module: str | None = None
    note: str = ""

    @property
    def spatial(self) -> bool:
        """A map with more than one position (a globally pooled 1×1 output is not spatial)."""
        return self.kind in SPATIAL_KINDS and len(self.shape) == 3 and self.shape[1] * self.shape[2] > 1

    @property
    def units(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class InputSpec:
    """How a backend wants its images: size hint, normalisation, channel order, and the memory layout of the
    ``(N, 3, H, W)`` batch ("contiguous", or "channels_last" for a model that runs channels-last: the batch
    then comes without a copy)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    memory_format: str = "contiguous"


@dataclass(frozen=True)
class BackendOptions:
    """What the user said about the model; each backend uses the options that apply to it."""

    weights: str | None = None
    device: str = "cpu"
    pretrained: bool = False
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bgr: bool = False
    #: ``--runtime``: torch, onnxruntime or auto; None is the backend's own (see ``Backend.runtimes``)
    runtime: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentInfo:
    """A named component a plugin registered (shown by ``dissect plugins``)."""

    kind: str
    name: str
    plugin: str
    description: str = ""


@dataclass
class TopImages:
    """Per unit, the k images with the largest maximum activation (collected in the activation pass).

    ``indices`` and ``scores`` are ``(units, k)`` sorted by descending score (index -1 = empty slot);
    ``maps`` are the raw activation maps ``(units, k, h, w)`` the report draws masks from.
    """

    indices: np.ndarray
    scores: np.ndarray
    maps: np.ndarray


@dataclass(frozen=True)
class Explanation:
    """One unit's explanation by an explainer (``--explain NAME``): a formula over concepts and its IoU.

    ``unit`` is 1-based, as in tally.csv; ``formula`` the explainer's text (``(red-c AND ball) OR box``);
    ``length`` the number of concepts in it; ``label`` and ``label_iou`` the unit's ordinary label (its best
    single concept, as in tally.csv) and that label's IoU, for comparison.
    """

    unit: int
    formula: str
    iou: float
    length: int
    label: str
    label_iou: float


@dataclass
class LayerResult:
    """Everything the protocol computes for one layer; every derived number comes from these counts."""

    layer: str
    vocabulary: Vocabulary
    thresholds: np.ndarray  # (U,) float64
    intersection: np.ndarray  # I[u, l]  (U, L) int64
    truth: np.ndarray  # G[l]     (L,)   int64
    activation: np.ndarray  # A[u, c]  (U, C) int64, C = len(vocabulary.categories)
    top_images: TopImages | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: The module (or graph tensor) the requested name resolved to; None when it is the name itself.
    module: str | None = None
    #: ``(units, h, w)`` of the raw maps the passes saw.
    map_shape: tuple[int, int, int] | None = None
    #: Why the layer's numbers may mean little (spatially constant maps, empty masks, ...).
    warnings: list[str] = field(default_factory=list)
    #: The intervals of a run with ``--bootstrap`` (None without).
    bootstrap: LayerBootstrap | None = None
    #: The explainer's results (``--explain``), by unit; None when no explainer ran.
    explanations: list[Explanation] | None = None

    @property
    def units(self) -> int:
        return int(self.thresholds.shape[0])


def layer_described(layer: LayerResult) -> str:
    """What a layer is, for reports: the module it resolved to and its map size (``stages.3, 320 × 7 × 7``);
    what a run saved before these were recorded leaves out."""
    parts = [f"module {layer.module}"] if layer.module and layer.module != layer.layer else []
    if layer.map_shape:
        parts.append("maps of " + " × ".join(str(d) for d in layer.map_shape) + " (units × h × w)")
    return ", ".join(parts)


@dataclass(frozen=True)
class SkippedSample:
    """A sample a run skipped (``--skip-bad``): its dataset position, its image file as the dataset names
    it (empty when it cannot say), and why, in one line naming the file that failed."""

    index: int
    image: str
    reason: str


@dataclass
class RunResult:
    """The results of one run: per layer, in the requested order, and the provenance."""

    layers: dict[str, LayerResult]
    provenance: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    images: int = 0
    written: list[str] = field(default_factory=list)
    #: The concept dataset of the run when it is at hand (not saved; reports reopen it from provenance).
    dataset: Any = None
    #: Plugins that failed during the run (``{"plugin", "where", "error"}``), saved in summary.json.
    plugin_errors: list[dict[str, str]] = field(default_factory=list)
    #: The samples skipped because they could not be read (``--skip-bad``), by dataset position.
    skipped: list[SkippedSample] = field(default_factory=list)

    def layer_names(self) -> Sequence[str]:
        return list(self.layers)
