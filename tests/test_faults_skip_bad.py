"""--skip-bad on a dataset with 1% corrupt images and 1% corrupt labels: the run completes, skipped.csv,
summary.json, the HTML report and the terminal say how many samples were skipped and which, and the counts
equal those of the dataset with those samples removed — checked against that run and against the plain
brute-force counts of ``netdissection.testing``."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import netdissection
from netdissection.api import build_host, choose_threshold, make_backend
from netdissection.core.errors import DissectionError
from netdissection.core.run import run_dissection
from netdissection.core.types import BackendOptions, RunResult
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.testing import reference_counts, reference_maps, tiny_model

from .test_ray_executor import assert_same_run, options, ray_cluster, torch_threads  # noqa: F401 (a fixture)

RunCli = Callable[..., tuple[int, str, str]]
IMAGES = 200
LAYERS = ["relu1", "conv2"]


class OneImageAtATime:
    """A model fed one image at a time whatever the batch, so that an image's maps never depend on the batch
    it came in (CPU convolutions may add in another order for another batch size). The scheduler still sees
    batches with holes where samples were skipped: that bookkeeping is what these tests check."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def activations(self, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        outs = [self.inner.activations(images[i:i + 1], layers) for i in range(len(images))]
        return {name: torch.cat([torch.as_tensor(out[name]) for out in outs]) for name in layers}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """The set with 1% corrupt images and 1% corrupt label maps, the same set without those samples, and the
    positions of the samples spoiled."""
    root = tmp_path_factory.mktemp("skip-bad")
    clean = generate_concept_set(root / "clean", images=IMAGES, image_size=32, seed=4)
    with open(clean / "index.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    labelled = [i for i, row in enumerate(rows) if row[header.index("object")]]
    rng = np.random.default_rng(7)
    spoiled_images = sorted(rng.choice(np.arange(1, IMAGES - 1), 2, replace=False).tolist())
    spoiled_labels = sorted(rng.choice([i for i in labelled if i not in spoiled_images], 2, replace=False).tolist())
    bad = shutil.copytree(clean, root / "bad")
    image = bad / "images" / rows[spoiled_images[0]][0]
    image.write_bytes(b"this is no JPEG")
    image = bad / "images" / rows[spoiled_images[1]][0]
    image.write_bytes(image.read_bytes()[: 200])  # truncated
    for i in spoiled_labels:
        label = bad / "images" / rows[i][header.index("object")].split(";")[0]
        label.write_bytes(label.read_bytes()[: len(label.read_bytes()) // 2])
    removed = shutil.copytree(clean, root / "removed")
    spoiled = sorted(spoiled_images + spoiled_labels)
    with open(removed / "index.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *(r for i, r in enumerate(rows) if i not in spoiled)])
    return bad, removed, spoiled


def tiny_backend() -> OneImageAtATime:
    """The testing kit's small seeded convolutional network, through the torchvision backend."""
    return OneImageAtATime(make_backend(build_host(), tiny_model(), None, BackendOptions())[1])


def dissect(dataset: Path, **options: Any) -> RunResult:
    host = build_host()
    rule = choose_threshold(host, None, None, quantile=None, compat="paper", device="cpu")
    return run_dissection(tiny_backend(), netdissection.open_dataset(str(dataset)), rule,  # type: ignore[arg-type]
                          backend_name="torchvision", layers=LAYERS, workers=0, batch_size=8, **options)


def test_the_counts_are_those_of_the_dataset_without_the_bad_samples(data: tuple[Path, Path, list[int]]) -> None:
    bad, removed, spoiled = data
    skipping = dissect(bad, skip_bad=True)
    without = dissect(removed)
    assert [s.index for s in skipping.skipped] == spoiled
    assert skipping.images == without.images == IMAGES - len(spoiled)
    kept = [i for i in range(IMAGES) if i not in spoiled]  # position in ``removed`` → position in ``bad``
    for layer in LAYERS:
        a, b = skipping.layers[layer], without.layers[layer]
        for counts in ("thresholds", "intersection", "truth", "activation"):
            assert np.array_equal(getattr(a, counts), getattr(b, counts)), (layer, counts)
        assert a.top_images is not None and b.top_images is not None
        assert np.array_equal(a.top_images.scores, b.top_images.scores)
        assert np.array_equal(a.top_images.indices, np.take(kept, b.top_images.indices))
    # ... and the brute force of the protocol, image by image, on the dataset without them.
    reduced = netdissection.open_dataset(str(removed))
    maps = reference_maps(tiny_backend(), reduced, "conv2")  # type: ignore[arg-type]
    reference = reference_counts(maps, reduced, skipping.layers["conv2"].thresholds)
    assert np.array_equal(reference.intersection, skipping.layers["conv2"].intersection)
    assert np.array_equal(reference.truth, skipping.layers["conv2"].truth)
    assert np.array_equal(reference.activation, skipping.layers["conv2"].activation)


def test_the_run_says_what_it_skipped(run_cli: RunCli, data: tuple[Path, Path, list[int]], tmp_path: Path) -> None:
    bad, _, spoiled = data
    out = tmp_path / "out"
    code, stdout, err = run_cli("resnet18", "--layer", "layer2", "--dataset", bad, "--out", out, "--skip-bad",
                                "--workers", "2", "--batch-size", "16", "--report", "tally,html")
    assert code == 0, err
    with open(bad / "index.csv", newline="") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    with open(out / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == spoiled
    assert [r["image"] for r in rows] == [f"images/{names[i]}" for i in spoiled]
    reasons = " ".join(r["reason"] for r in rows)
    assert reasons.count("_object.png") == 2  # the two label maps, named ...
    assert all(names[i] in r["reason"] or "_object.png" in r["reason"] for i, r in zip(spoiled, rows, strict=True))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"]["count"] == 4 and summary["skipped"]["file"] == "skipped.csv"
    assert [s["index"] for s in summary["skipped"]["samples"]] == spoiled
    assert summary["images"] == IMAGES - 4 and "skipped.csv" in summary["written"]
    page = (out / "report.html").read_text()
    assert "4 samples could not be read and were skipped (--skip-bad)" in page
    assert all(f"images/{names[i]}" in page for i in spoiled)
    assert "4 samples could not be read" in " ".join(stdout.split())
    # Each bad sample is named once, not once per pass.
    assert " ".join(err.split()).count("skipped: ") == 4
    # Rebuilding the reports keeps the list.
    code, _, err = run_cli("report", out)
    assert code == 0, err
    assert "4 samples could not be read" in (out / "report.html").read_text()
    assert (out / "skipped.csv").is_file()


class ChangesUnderfoot:
    """A dataset whose sample 5 loads in the first pass and fails afterwards (its file replaced mid-run)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.loads = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, index: int, **kwargs: Any) -> Any:
        if index == 5:
            self.loads += 1
            if self.loads > 1:
                raise DissectionError("label image x_object.png is truncated")
        return self.inner.load(index, **kwargs)


def test_a_sample_that_goes_bad_during_the_run_stops_it(data: tuple[Path, Path, list[int]]) -> None:
    """Skipping a sample in a later pass only would count it in the thresholds but not in the IoU: refused."""
    _, removed, _ = data
    host = build_host()
    rule = choose_threshold(host, None, None, quantile=None, compat="paper", device="cpu")
    dataset = ChangesUnderfoot(netdissection.open_dataset(str(removed)))
    with pytest.raises(DissectionError, match=r"x_object\.png is truncated, though the first pass read it: the "
                                              "dataset changed during the run"):
        run_dissection(tiny_backend(), dataset, rule, backend_name="torchvision", layers=["conv2"],  # type: ignore[arg-type]
                       workers=0, skip_bad=True, cache="recompute")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ray_shards_skip_the_same_samples(tmp_path: Path) -> None:
    """Sharded on Ray, each shard skips its own bad samples; the merged run lists them all, and its tables and
    counts equal the one-process run's."""
    clean = generate_concept_set(tmp_path / "clean", images=12, image_size=64, seed=0)
    with open(clean / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bad = shutil.copytree(clean, tmp_path / "bad")
    (bad / "images" / rows[1]["image"]).write_bytes(b"no image")  # shard 0
    label = bad / "images" / next(r for r in rows[8:] if r["object"])["object"].split(";")[0]  # shard 2
    label.write_bytes(label.read_bytes()[:40])
    runs = {}
    with torch_threads(1):
        netdissection.compare(["timm:test_resnet"], dataset=bad, store=False, out=tmp_path / "local",
                              skip_bad=True, **options("paper"))
    netdissection.compare(["timm:test_resnet"], dataset=bad, store=False, out=tmp_path / "ray", executor="ray",
                          executor_options={"shards": 3}, skip_bad=True, **options("paper"))
    for name in ("local", "ray"):
        runs[name] = tmp_path / name / "runs" / "test_resnet"
    assert_same_run(runs["ray"], runs["local"])
    listed = [(runs[name] / "skipped.csv").read_text() for name in ("local", "ray")]
    assert listed[0] == listed[1] and len(listed[0].splitlines()) == 3, listed
    summary = json.loads((runs["ray"] / "summary.json").read_text())
    assert summary["skipped"]["count"] == 2 and summary["images"] == 10
