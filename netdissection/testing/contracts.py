"""Contract checks a plugin author calls on each component: what the host relies on, checked for real.

Each ``check_*`` raises ``AssertionError`` with a message naming the broken promise, and returns what it
computed (for further checks in the caller's test).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.types import InputSpec, LayerInfo, RunResult, Sample, Vocabulary
from .audit import Audit

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.protocols import Backend, ConceptDataset, ReportWriter

#: The compute operators counted to tell one forward pass from several (torch backends).
HEAVY_OPS = ("aten::convolution", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")


# ------------------------------------------------------------------------------------------------ backends


def check_backend(backend: Backend, *, layers: Sequence[str] | None = None, images: torch.Tensor | None = None,
                  count_forwards: Callable[[], int] | None = None, rtol: float = 1e-4,
                  atol: float = 1e-5) -> dict[str, torch.Tensor]:
    """A backend keeps its contract:

    - ``layers()`` lists unique :class:`LayerInfo` names, at least one with a spatial map;
    - ``input_spec()`` is an :class:`InputSpec`; ``describe()`` a JSON-serialisable dict naming the ``model``;
    - ``activations(images, layers)`` returns exactly the requested layers, each ``(N, *LayerInfo.shape)``
      for images of the ``input_spec()`` size;
    - batch independence: an image's maps do not depend on the other images of its batch;
    - one forward pass per batch: asking for every layer at once costs what asking for the deepest costs
      (counted with ``count_forwards()`` when given — a callable returning forwards run so far — else by
      the torch operators the profiler sees).

    ``layers`` defaults to every spatial layer; ``images`` to two seeded normalised images.
    Returns the maps of ``images``.
    """
    import torch

    infos = backend.layers()
    assert isinstance(infos, list) and infos, "layers() must return a non-empty list of LayerInfo"
    assert all(isinstance(i, LayerInfo) for i in infos), "layers() must return LayerInfo objects"
    names = [i.name for i in infos]
    assert len(set(names)) == len(names), f"layers() lists a name twice: {names}"
    by_name = {i.name: i for i in infos}
    spatial = [i.name for i in infos if i.spatial]
    assert spatial, "layers() lists no layer with a spatial map: nothing could be dissected"
    wanted = list(layers) if layers is not None else spatial
    for name in wanted:
        assert name in by_name, f"{name!r} is not among layers(): {names}"

    spec = backend.input_spec()
    assert isinstance(spec, InputSpec), "input_spec() must return an InputSpec"
    assert len(spec.mean) == 3 and len(spec.std) == 3, "input_spec() mean and std need three values"
    assert spec.channel_order.upper() in ("RGB", "BGR"), "input_spec().channel_order is RGB or BGR"
    assert spec.memory_format in ("contiguous", "channels_last"), \
        "input_spec().memory_format is 'contiguous' or 'channels_last'"
    described = backend.describe()
    assert isinstance(described, dict) and "model" in described, "describe() must return a dict with 'model'"
    json.dumps(described)  # provenance goes into summary.json

    if images is None:
        size = spec.size or (224, 224)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, *size, generator=generator)
    out = backend.activations(images, wanted)
    assert set(out) == set(wanted), f"activations() returned {sorted(out)} for {sorted(wanted)}"
    for name in wanted:
        maps = torch.as_tensor(out[name])
        expected = (images.shape[0], *by_name[name].shape)
        assert tuple(maps.shape) == expected, (
            f"layer {name!r}: activations() gives {tuple(maps.shape)}, layers() promised {expected}")

    for i in range(images.shape[0]):
        alone = backend.activations(images[i:i + 1], wanted)
        for name in wanted:
            torch.testing.assert_close(torch.as_tensor(alone[name])[0].float(), torch.as_tensor(out[name])[i].float(),
                                       rtol=rtol, atol=atol,
                                       msg=lambda m, n=name, k=i: f"layer {n!r}: image {k} alone differs from "
                                                                 f"image {k} in a batch (batch dependence): {m}")

    deepest = max(wanted, key=names.index)
    one, every = _cost(backend, images, [deepest], count_forwards), _cost(backend, images, wanted, count_forwards)
    if one is not None and every is not None:
        assert every <= one, (f"asking for {len(wanted)} layers costs {every} (forwards or compute operators), "
                              f"asking for {deepest!r} alone {one}: the layers must come out of ONE forward pass")
    return {name: torch.as_tensor(out[name]) for name in wanted}


def _cost(backend: Backend, images: torch.Tensor, layers: list[str],
          count_forwards: Callable[[], int] | None) -> int | None:
    if count_forwards is not None:
        before = count_forwards()
        backend.activations(images, layers)
        return count_forwards() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.activations(images, layers)
    heavy = sum(1 for event in prof.events() if event.name in HEAVY_OPS)
    return heavy or None  # no torch operator seen: not a torch backend; pass count_forwards= to check it


# ------------------------------------------------------------------------------------------------ datasets


def check_dataset(dataset: ConceptDataset, *, reopen: Callable[..., ConceptDataset] | None = None,
                  indices: Sequence[int] | None = None) -> list[Sample]:
    """A concept dataset keeps its contract:

    - a :class:`Vocabulary` whose categories are all used by its concepts;
    - every sample readable (``indices``: default all): an RGB uint8 image, label layers ``(K, sh, sw)`` of
      the sample's label shape, every label (pixel or image-level) a concept of the vocabulary; asking for
      only the image or only the labels gives the same parts;
    - ``describe()`` a JSON-serialisable dict with ``format``, ``path``, ``images`` (= ``len``) and
      ``categories``; ``reopen(path, categories=..., **options)`` (the registered factory) opens the same
      set from it — what reports do when they are rebuilt from saved results;
    - picklable (samples load in worker processes), and the same after a round trip.

    Returns the samples read.
    """
    vocab = dataset.vocabulary
    assert isinstance(vocab, Vocabulary), "the dataset's vocabulary must be a Vocabulary"
    assert vocab.categories, "the vocabulary has no category"
    numbers = {c.number for c in vocab.concepts}
    total = len(dataset)
    assert total > 0, "the dataset has no sample"
    samples = []
    for index in indices if indices is not None else range(total):
        sample = dataset.load(index)
        where = f"sample {index}"
        assert isinstance(sample, Sample), f"{where}: load() must return a Sample"
        assert sample.index == index, f"{where}: load({index}) returned index {sample.index}"
        image = sample.image
        assert image is not None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, (
            f"{where}: the image must be RGB uint8 (H, W, 3), not {getattr(image, 'dtype', None)} "
            f"{getattr(image, 'shape', None)}")
        layers = sample.layers
        assert layers is not None and layers.ndim == 3, f"{where}: label layers must be (K, sh, sw)"
        assert np.issubdtype(layers.dtype, np.integer), f"{where}: label layers must hold integers"
        assert tuple(layers.shape[1:]) == tuple(sample.label_shape), (
            f"{where}: label layers are {layers.shape[1:]}, label_shape says {sample.label_shape}")
        found = {int(v) for v in np.unique(layers)} | {int(v) for v in sample.image_labels}
        unknown = sorted(found - numbers - {0})
        assert not unknown, f"{where}: labels {unknown[:5]} are not concepts of the vocabulary"
        only_labels = dataset.load(index, image=False, labels=True)
        assert only_labels.layers is not None and np.array_equal(only_labels.layers, layers), (
            f"{where}: load(image=False) gives other labels")
        assert tuple(only_labels.image_labels) == tuple(sample.image_labels), (
            f"{where}: load(image=False) gives other image-level labels")
        only_image = dataset.load(index, image=True, labels=False)
        assert only_image.image is not None and np.array_equal(only_image.image, image), (
            f"{where}: load(labels=False) gives another image")
        samples.append(sample)

    described = dataset.describe()
    assert isinstance(described, dict), "describe() must return a dict"
    json.dumps(described)
    for key in ("format", "path", "images", "categories"):
        assert key in described, (f"describe() lacks {key!r}: reports rebuilt from saved results reopen the "
                                  "dataset from format, path, categories and options")
    assert described["images"] == total, f"describe() says {described['images']} images, len() {total}"
    assert list(described["categories"]) == list(vocab.categories), "describe()['categories'] differs"

    copy = pickle.loads(pickle.dumps(dataset))
    _same(dataset, copy, samples, "after a pickle round trip")
    if reopen is not None:
        options = dict(described.get("options") or {})
        again = reopen(described["path"], categories=described["categories"], **options)
        _same(dataset, again, samples, "reopened from describe()")
    return samples


def _same(dataset: ConceptDataset, other: ConceptDataset, samples: list[Sample], how: str) -> None:
    assert len(other) == len(dataset), f"{how}: {len(other)} samples, not {len(dataset)}"
    assert other.vocabulary == dataset.vocabulary, f"{how}: another vocabulary"
    for sample in samples:
        again = other.load(sample.index)
        assert again.image is not None and sample.image is not None
        assert np.array_equal(again.image, sample.image), f"{how}: sample {sample.index} has another image"
        assert again.layers is not None and sample.layers is not None
        assert np.array_equal(again.layers, sample.layers), f"{how}: sample {sample.index} has other labels"
        assert tuple(again.image_labels) == tuple(sample.image_labels), (
            f"{how}: sample {sample.index} has other image-level labels")


# ------------------------------------------------------------------------------------------------ threshold rules


def check_threshold_rule(factory: Callable[..., Any], params: Mapping[str, Any] | None = None, *, units: int = 5,
                         batches: int = 4, batch: int = 3, map_size: int = 4, seed: int = 0) -> np.ndarray:
    """A threshold rule keeps its contract, on seeded activations (with ties and negative values):

    - ``finish()`` gives one float64 threshold per unit;
    - streaming equals one-shot: ``update`` batch by batch gives exactly what one ``update`` with every
      value gives;
    - a rule that declares itself mergeable (a ``merge`` method) gives, merged from two rules that each saw
      half of the batches, exactly what one rule that saw them all gives.

    ``factory(units, values_per_unit, **params)`` is called as the host calls it. Returns the thresholds.
    """
    import torch

    params = dict(params or {})
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, units, map_size, map_size, generator=generator) for _ in range(batches)]
    maps[0][0, :, :2, :2] = 0.5  # ties
    values = batches * batch * map_size * map_size

    def run(parts: Sequence[torch.Tensor]) -> Any:
        rule = factory(units, values, **params)
        for part in parts:
            rule.update(part)
        return rule

    streamed = run(maps).finish()
    thresholds = np.asarray(streamed)
    assert thresholds.dtype == np.float64 and thresholds.shape == (units,), (
        f"finish() must give float64 of shape ({units},), not {thresholds.dtype} {thresholds.shape}")
    once = np.asarray(run([torch.cat(maps)]).finish())
    np.testing.assert_array_equal(thresholds, once, err_msg="streaming batch by batch differs from one update")
    probe = factory(units, values, **params)
    if hasattr(probe, "merge"):
        first, second = run(maps[: batches // 2]), run(maps[batches // 2:])
        merged = first.merge(second)
        merged = merged if merged is not None else first
        np.testing.assert_array_equal(np.asarray(merged.finish()), thresholds,
                                      err_msg="merging two halves differs from one rule that saw everything")
    return thresholds


# ------------------------------------------------------------------------------------------------ report writers


def check_report_writer(writer: ReportWriter, result: RunResult, folder: str | Path, *,
                        same_bytes: bool = True) -> list[Path]:
    """A report writer keeps its contract (``folder``: an empty scratch folder, e.g. ``tmp_path``):

    - it returns the paths it wrote, each under the output folder, and every file it leaves there is one
      of them (or inside one): no stray temporary files;
    - nothing is written, renamed or removed outside the output folder;
    - atomic: every file it returns is renamed into place (``core.files.atomic_write``), never written
      under its final name — a run killed half way leaves nothing that looks complete;
    - idempotent: writing again returns the same paths and leaves the same files (the same bytes, with
      ``same_bytes``).

    The writer runs once in a warm-up folder first (lazy imports and library caches are not its writes).
    Writes from other processes are not seen: check a writer that forks workers with one worker. Returns
    the paths of the checked write.
    """
    folder = Path(folder)
    warm_up, out = folder / "warm-up", folder / "out"
    for where in (warm_up, out):  # a run makes its output folder before any writer runs
        where.mkdir(parents=True, exist_ok=True)
    writer.write(result, warm_up)
    root = os.path.realpath(out)
    with Audit() as audit:
        paths = writer.write(result, out)
    assert isinstance(paths, list) and all(isinstance(p, Path) for p in paths), "write() must return a list of Paths"
    real = [os.path.realpath(p) for p in paths]
    for path, resolved in zip(paths, real, strict=True):
        assert os.path.exists(resolved), f"write() returned {path}, which does not exist"
        assert _inside(resolved, root), f"write() returned {path}, outside the output folder {out}"
    outside = sorted({p for p in audit.touched() if not _inside(p, root)})
    assert not outside, f"the writer wrote outside the output folder: {outside[:5]}"
    renamed_to = {dst for _, dst in audit.renamed}
    for resolved in real:
        files = [resolved] if os.path.isfile(resolved) else []
        if os.path.isdir(resolved) and resolved not in renamed_to:
            files = [str(p) for p in Path(resolved).rglob("*") if p.is_file()]
        for file in files:
            assert file not in audit.opened, (f"{file} was written under its final name: write a temporary "
                                              "sibling and rename it into place (core.files.atomic_write)")
            assert file in renamed_to or any(_inside(file, d) for d in renamed_to), (
                f"{file} was not renamed into place: write it atomically (core.files.atomic_write)")
    left = _files(out)
    stray = sorted(f for f in left if not any(f == p or _inside(f, p) for p in real))
    assert not stray, f"the writer left files it did not return: {stray[:5]}"

    before = {f: Path(f).read_bytes() for f in left}
    again = writer.write(result, out)
    assert sorted(os.path.realpath(p) for p in again) == sorted(real), "writing again returned other paths"
    after = {f: Path(f).read_bytes() for f in _files(out)}
    assert sorted(after) == sorted(before), (
        f"writing again changed the files: {sorted(set(after) ^ set(before))[:5]}")
    if same_bytes:
        changed = sorted(f for f in before if before[f] != after[f])
        assert not changed, f"writing again wrote other bytes: {changed[:5]}"
    return paths


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _files(root: Path) -> list[str]:
    return sorted(os.path.realpath(p) for p in root.rglob("*") if p.is_file())
