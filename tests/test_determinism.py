"""Determinism: the same run twice writes the same bytes — tally.csv, thresholds.csv, counts.npz, and
summary.json but for the time stamps and durations in its named fields — whatever ``--workers`` and
whether or not through the results store; a shuffled dataset gives the same counts; other batch sizes
agree as far as float convolutions allow (what differs is measured in the README)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import netdissection
from netdissection.core.results import save_counts
from netdissection.core.scores import iou_matrix
from netdissection.core.types import Concept, LayerResult, TopImages, Vocabulary
from netdissection.core.volatile import VOLATILE_FIELDS, without_volatile
from netdissection.plugins.datasets.generated import generate_concept_set

from .faults_kit import result_files

RunCli = Callable[..., tuple[int, str, str]]
MODEL = ("resnet18", "--layer", "layer1", "--layer", "layer2", "--batch-size", "8", "--report", "tally,thresholds")


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=24, image_size=32, seed=3)


def _get(node: Any, path: tuple[str, ...]) -> list[Any]:
    if not path:
        return [node]
    head, rest = path[0], path[1:]
    if head == "*":
        return [v for item in node for v in _get(item, rest)]
    return _get(node[head], rest)


def _set(node: Any, path: tuple[str, ...], values: list[Any]) -> None:
    """Put ``values`` (as ``_get`` lists them) at ``path``."""
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node:
            _set(item, rest, values)
    elif rest:
        _set(node[head], rest, values)
    else:
        node[head] = values.pop(0)


def test_the_same_run_twice_writes_the_same_bytes(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    runs = {
        "workers 0": ["--workers", "0", "--no-store"],
        "workers 2": ["--workers", "2", "--no-store"],
        "through the store": ["--workers", "0", "--store", tmp_path / "store"],
    }
    for name, options in runs.items():
        code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", tmp_path / name, *options)
        assert code == 0, err
    files = {name: result_files(tmp_path / name) for name in runs}
    assert sorted(files["workers 0"]) == ["layer1/counts.npz", "layer1/tally.csv", "layer1/thresholds.csv",
                                          "layer2/counts.npz", "layer2/tally.csv", "layer2/thresholds.csv",
                                          "summary.json"]
    for name in runs:
        for path, content in files["workers 0"].items():
            assert files[name][path] == content, (name, path)

    # summary.json differs in exactly the named fields: with them copied over, the files are byte for byte equal.
    first = (tmp_path / "workers 0" / "summary.json").read_text(encoding="utf-8")
    for name in ("workers 2", "through the store"):
        other = json.loads((tmp_path / name / "summary.json").read_text(encoding="utf-8"))
        for path in VOLATILE_FIELDS:
            _set(other, path, _get(json.loads(first), path))
        assert json.dumps(other, indent=2) + "\n" == first, name
    # ... and those fields are there, and do hold times.
    summary = json.loads(first)
    assert time.strftime("%Y-") in _get(summary, ("provenance", "started"))[0]
    assert set(_get(summary, ("seconds",))[0]) >= {"activations", "iou"}
    assert all("activations" in s for s in _get(summary, ("layers", "*", "seconds")))
    assert "started" not in json.dumps(without_volatile(summary))


def test_counts_npz_does_not_depend_on_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    vocab = Vocabulary(("object", "color"), tuple(Concept(n, f"c{n}", ("object", "color")[n % 2], ("object",))
                                                  for n in range(1, 6)))
    layer = LayerResult("layer", vocab, rng.random(8), rng.integers(0, 99, (8, vocab.size)),
                        rng.integers(0, 99, vocab.size), rng.integers(0, 99, (8, len(vocab.categories))),
                        TopImages(rng.integers(0, 9, (8, 3)), rng.random((8, 3)), rng.random((8, 3, 4, 4))))
    first = save_counts(layer, tmp_path / "a.npz").read_bytes()
    later = time.time() + 3 * 365 * 86400  # three years on
    monkeypatch.setattr(time, "time", lambda: later)
    monkeypatch.setattr(time, "time_ns", lambda: int(later * 1e9))
    monkeypatch.setattr(time, "localtime", lambda *a: time.gmtime(later))
    assert save_counts(layer, tmp_path / "b.npz").read_bytes() == first
    # No member carries a date (zip's own epoch, 1980-01-01, stands for none).
    assert {m.date_time for m in zipfile.ZipFile(io.BytesIO(first)).infolist()} == {(1980, 1, 1, 0, 0, 0)}


def _shuffled_copy(source: Path, target: Path, seed: int) -> list[str]:
    """The concept set with index.csv's rows in another order; returns the image names in the new order."""
    shutil.copytree(source, target)
    with open(source / "index.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    order = np.random.default_rng(seed).permutation(len(body))
    with open(target / "index.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *(body[i] for i in order)])
    return [body[i][0] for i in order]


def test_a_shuffled_dataset_gives_the_same_counts(concept_set: Path, tmp_path: Path) -> None:
    with open(concept_set / "index.csv", newline="") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    shuffled_names = _shuffled_copy(concept_set, tmp_path / "shuffled", seed=1)
    assert shuffled_names != names
    options: dict[str, Any] = {"layers": ["layer1", "layer2"], "workers": 0, "batch_size": 8, "top_k": 5}
    plain = netdissection.dissect("resnet18", dataset=str(concept_set), **options)
    shuffled = netdissection.dissect("resnet18", dataset=str(tmp_path / "shuffled"), **options)
    for layer in ("layer1", "layer2"):
        a, b = plain.layers[layer], shuffled.layers[layer]
        for counts in ("thresholds", "intersection", "truth", "activation"):
            assert np.array_equal(getattr(a, counts), getattr(b, counts)), (layer, counts)
        # The same top images (by file), in the same order but among images of equal peak activation, which the
        # total order ranks by dataset position.
        assert a.top_images is not None and b.top_images is not None
        assert np.array_equal(a.top_images.scores, b.top_images.scores)
        for unit in range(a.units):
            scores = a.top_images.scores[unit]
            mine = [names[i] for i in a.top_images.indices[unit]]
            theirs = [shuffled_names[i] for i in b.top_images.indices[unit]]
            for value in np.unique(scores):
                tied = scores == value
                if value == scores.min() and tied.sum() > 1:
                    continue  # images tied at the last kept score: another position may rank another image in
                assert sorted(np.array(mine)[tied]) == sorted(np.array(theirs)[tied]), (layer, unit)


@pytest.mark.slow
def test_batch_sizes_agree_as_far_as_float_convolutions_allow(concept_set: Path) -> None:
    """Convolutions on CPU add in another order for another batch size (oneDNN picks its kernel by shape), so
    the maps may differ in their last bits: the labels' counts (G) are exact, the thresholds agree to a few
    units in the last place, and a pixel at a threshold's edge may flip, moving an IoU by ~1e-5."""
    runs = {size: netdissection.dissect("resnet18", dataset=str(concept_set), layers=["layer1", "layer2"],
                                        workers=0, batch_size=size) for size in (1, 5, 24)}
    for layer in ("layer1", "layer2"):
        base = runs[1].layers[layer]
        for size in (5, 24):
            other = runs[size].layers[layer]
            assert np.array_equal(base.truth, other.truth)
            np.testing.assert_allclose(other.thresholds, base.thresholds, rtol=1e-4, atol=1e-6)
            assert np.abs(iou_matrix(other) - iou_matrix(base)).max() <= 1e-3
            changed = np.count_nonzero(other.intersection != base.intersection)
            assert changed <= max(2, 0.01 * base.intersection.size), (layer, size, changed)
