"""The bootstrap (``--bootstrap B``): per-block counts that add up to the brute force, resamples scored as the
run scores itself, intervals that cover the truth in simulation, and B = 0 changing nothing."""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import netdissection
from netdissection.core import loading
from netdissection.core.bootstrap import (
    STABLE,
    BlockCountsPartial,
    BootstrapSpec,
    deal_blocks,
    layer_bootstrap,
    resample_scores,
    resampled_counts,
)
from netdissection.core.iou import LabelBatch, TallyCounts, prepare_labels
from netdissection.core.jobkey import Job, key_material, key_of
from netdissection.core.partials import LayerCounts, merge_all, settle_thresholds, split_shards
from netdissection.core.scheduler import ShardRunner, run_passes
from netdissection.core.scores import count_detectors, unit_labels, unit_scores
from netdissection.core.types import LayerResult
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.plugins.reports.writers import BOOTSTRAP_COLUMNS, tally_header
from netdissection.summary import print_summary

from . import bruteforce
from .cli_checks import assert_one_line_error
from .random_broden import write_random_broden
from .test_exactness import Recorder, tiny_model
from .test_planted import MEAN, STD, PlantedModel
from .test_shards import plan_for


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_broden(tmp_path_factory.mktemp("data") / "broden", images=20, image_size=16,
                               label_size=8, seed=1)


# ---- the counts of every block ----------------------------------------------------------------------------------


def test_blocks_deal_every_image_once_at_random() -> None:
    block_of = deal_blocks(103, 10, seed=7)
    assert sorted(np.bincount(block_of)) == [10] * 7 + [11] * 3  # sizes differ by at most one
    assert not np.array_equal(block_of, np.arange(103) % 10)  # not by index order
    assert np.array_equal(block_of, deal_blocks(103, 10, seed=7))
    assert not np.array_equal(block_of, deal_blocks(103, 10, seed=8))
    spec = BootstrapSpec(200, seed=3)
    assert spec.block_count(12) == 12 and spec.block_count(10_000) == 50
    weights = spec.weights(50)
    assert weights.shape == (200, 50) and (weights.sum(axis=1) == 50).all()


@pytest.mark.parametrize("compat", ["paper", "lite"])
def test_block_counts_add_up_to_the_brute_force(broden: Path, compat: str) -> None:
    """Each block's I, G, A equal the brute force over that block's images at the run's thresholds; two
    shards (pickled, as an executor would carry them) merge into the blocks of one run; the blocks add up
    to the counts of a run without a bootstrap, bit for bit."""
    model = tiny_model()
    recorder = Recorder(model)
    plan, spec = plan_for(model, broden, compat, radix_layer=None, cache="disk")
    boot = BootstrapSpec(20, seed=4, blocks=6)
    runners = [ShardRunner(plan, spec, shard) for shard in split_shards(20, 2, 4)]
    try:
        activations = merge_all(r.activation_pass() for r in runners)
        thresholds = settle_thresholds(activations, lambda states: [r.threshold_round(states) for r in runners])
        parts = [pickle.loads(pickle.dumps(r.iou_pass(thresholds, boot.accumulator(20)))) for r in runners]
    finally:
        for r in runners:
            r.close()
    counts = merge_all(reversed(parts))
    assert isinstance(counts, BlockCountsPartial)
    plain, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, radix_layer=None))

    data = bruteforce.read_broden(broden)
    block_of = deal_blocks(20, 6, seed=4)
    assert counts.block_images.tolist() == np.bincount(block_of, minlength=6).tolist()
    for layer in ("1", "2"):
        acts = recorder.outputs[layer]
        assert len(acts) == 20
        blocks = counts.blocks[layer]
        assert blocks.intersection.shape[0] == 6 and blocks.intersection.dtype == np.int32
        for b in range(6):
            members = np.flatnonzero(block_of == b).tolist()
            subset = dataclasses.replace(data, **{f: [getattr(data, f)[i] for i in members] for f in
                                                  ("layers", "image_labels", "label_shapes", "images")})
            expected = bruteforce.dissect([acts[i] for i in members], subset, lite=compat == "lite",
                                          thresholds=thresholds[layer])
            for label in data.pcat:
                assert counts.block_truth[b, label] == expected.truth.get(label, 0), (layer, b, label)
                for u in range(blocks.intersection.shape[1]):
                    assert blocks.intersection[b, u, label] == expected.intersection.get((u, label), 0)
            for c, name in enumerate(data.categories):
                for u in range(blocks.activation.shape[1]):
                    assert blocks.activation[b, u, c] == expected.activation.get((u, name), 0), (layer, b, u, name)
        assert blocks.intersection.sum() > 0
        # The blocks add up to the run's counts, which are those of a run without a bootstrap.
        summed = counts.layers[layer]
        np.testing.assert_array_equal(blocks.intersection.sum(axis=0), summed.intersection)
        np.testing.assert_array_equal(blocks.activation.sum(axis=0), summed.activation)
        np.testing.assert_array_equal(counts.block_truth.sum(axis=0), counts.truth)
        for got, want in ((summed.intersection, plain[layer].intersection), (summed.activation,
                          plain[layer].activation), (counts.truth, plain[layer].truth)):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_block_counts_widen_rather_than_wrap() -> None:
    """int32 block counts that could pass 2³¹ − 1 become int64, in a shard and when shards merge."""
    big = np.full((2, 1, 3), 2**31 - 10, dtype=np.int32)
    part = BlockCountsPartial({"x": LayerCounts(np.zeros((1, 3), np.int64), np.zeros((1, 1), np.int64))},
                              np.zeros(3, np.int64), 1, {"x": LayerCounts(big, np.zeros((2, 1, 1), np.int64))},
                              np.zeros((2, 3), np.int64), np.ones(2, np.int64))
    merged = part.merge(part).blocks["x"].intersection
    assert merged.dtype == np.int64 and int(merged.max()) == 2 * (2**31 - 10)


# ---- the resamples, scored as a run is ------------------------------------------------------------------------


def _with_counts(result: LayerResult, intersection: np.ndarray, activation: np.ndarray,
                 truth: np.ndarray) -> LayerResult:
    return dataclasses.replace(result, intersection=intersection, activation=activation, truth=truth)


def test_each_resample_is_scored_as_a_run_with_its_counts(broden: Path) -> None:
    """The vectorised resampling against the package's own scorer (scores.py) run on each resample's counts:
    labels, IoUs and both counting rules; all-ones weights give back the run itself."""
    plan, spec = plan_for(tiny_model(), broden, "paper", radix_layer=None)
    runner = ShardRunner(plan, spec)
    try:
        activations = runner.activation_pass()
        thresholds = settle_thresholds(activations, lambda states: [runner.threshold_round(states)])
        counts = runner.iou_pass(thresholds, BootstrapSpec(20, seed=2, blocks=5).accumulator(20))
    finally:
        runner.close()
    assert isinstance(counts, BlockCountsPartial)
    rng = np.random.default_rng(0)
    weights = np.vstack([np.ones(5), rng.multinomial(5, [0.2] * 5, size=6)]).astype(np.float64)
    for layer in ("1", "2"):
        blocks = counts.blocks[layer]
        base = LayerResult(layer, plan.dataset.vocabulary, thresholds[layer], counts.layers[layer].intersection,
                           counts.truth, counts.layers[layer].activation)
        resampled = resample_scores(base, blocks, counts.block_truth, weights)
        per_resample = resampled_counts(resampled, base.vocabulary)
        for r, w in enumerate(weights.astype(np.int64)):
            result = _with_counts(base, np.tensordot(w, blocks.intersection, 1), np.tensordot(w, blocks.activation, 1),
                                  w @ counts.block_truth)
            labels, scores = unit_labels(result)
            assert resampled.labels[r].tolist() == labels.tolist()
            assert resampled.scores[r].tobytes() == scores.tobytes()  # the same arithmetic, to the bit
            want = count_detectors(unit_scores(result), base.vocabulary.categories)
            assert per_resample["detectors"][r] == want.detectors
            assert per_resample["unique_labels"][r] == want.unique_labels
            assert per_resample["paper_unique_labels_total"][r] == want.paper_unique_total
            for c in base.vocabulary.categories:
                assert per_resample["detectors_by_category"][c][r] == want.detectors_by_category[c]
                assert per_resample["unique_labels_by_category"][c][r] == want.unique_by_category[c]
                assert per_resample["paper_units_by_category"][c][r] == want.paper_units_by_category[c]
                assert per_resample["paper_unique_labels_by_category"][c][r] == want.paper_unique_by_category[c]
        assert resampled.labels[0].tolist() == unit_labels(base)[0].tolist()


# ---- coverage, by simulation ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Planted:
    """A planted model's maps and the prepared labels of a generated set, computed once."""

    vocabulary: Any
    maps: torch.Tensor  # (N, U, h, w)
    batches: list[tuple[np.ndarray, LabelBatch]]  # (dataset indices, labels) per loader batch

    def thresholds(self, images: np.ndarray, q: float) -> np.ndarray:
        values = self.maps[torch.from_numpy(images)].transpose(0, 1).reshape(self.maps.shape[1], -1)
        return np.quantile(values.double().numpy(), 1 - q, axis=1)

    def count(self, images: np.ndarray, thresholds: np.ndarray, accumulator: Any) -> Any:
        """The IoU pass over ``images`` only (a run on that subset), into ``accumulator``."""
        chosen = np.zeros(len(self.maps), dtype=bool)
        chosen[images] = True
        for indices, labels in self.batches:
            keep = torch.from_numpy(chosen[indices])
            if not keep.any():
                continue
            sub = LabelBatch(labels.layers[keep], labels.image_labels[keep], labels.has_category[keep],
                             labels.shape, labels.truth[keep])  # type: ignore[index]
            accumulator.add_truth(indices[keep.numpy()], sub.truth.sum(dim=0))  # type: ignore[union-attr]
            accumulator.add("u", indices[keep.numpy()], self.maps[torch.from_numpy(indices[keep.numpy()])], sub)
        return accumulator.partial()

    def result(self, partial: Any, thresholds: np.ndarray) -> LayerResult:
        counts = partial.layers["u"]
        return LayerResult("u", self.vocabulary, thresholds, counts.intersection, partial.truth, counts.activation)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = generate_concept_set(tmp_path_factory.mktemp("planted") / "set", images=400, image_size=64, seed=5)
    dataset = BrodenDataset(root)
    vocabulary = dataset.vocabulary
    category_of = torch.from_numpy(vocabulary.primary_category_index())
    model = PlantedModel(torch.zeros(22)).eval()  # red and texture detectors (the car readout is not needed)
    maps, batches = [], []
    for batch in loading.iterate(dataset, batch_size=100, workers=0, image=True, labels=True, skip_bad=False):
        assert batch.images is not None and batch.layers is not None and batch.image_labels is not None
        with torch.inference_mode():
            maps.append(model((batch.images.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD))
        labels, _ = prepare_labels(batch.layers, batch.image_labels, category_of, len(vocabulary.categories), "paper")
        batches.append((batch.indices, labels))
    return Planted(vocabulary, torch.cat(maps)[:, :2].contiguous(), batches)


def test_intervals_from_half_the_images_cover_the_full_set_iou(planted: Planted) -> None:
    """For the planted red and texture detectors, the 95% interval of a run on a random half of the images (its
    own thresholds, 200 resamples) covers the IoU of the run on all of them in at least 36 of 40 halves.

    (At q = 0.1 the red unit's threshold falls on the soft edges of red regions and moves with the sample:
    intervals that hold the thresholds fixed then cover far less often — 17 of 40 when measured. At the
    paper's q and at 0.03, below, the IoU's own sampling spread dominates.)"""
    q, images = 0.03, len(planted.maps)
    everything = np.arange(images)
    full = planted.thresholds(everything, q)
    labels, truth = unit_labels(planted.result(planted.count(everything, full, TallyCounts(
        {"u": full}, planted.vocabulary, "paper")), full))
    names, categories = planted.vocabulary.names(), planted.vocabulary.primary_category_index()
    assert names[labels[0]] == "red-c" and planted.vocabulary.categories[categories[labels[1]]] == "texture"
    assert (truth > 0.1).all(), truth
    rng = np.random.default_rng(0)
    covered = np.zeros(2, dtype=int)
    widths = []
    for repetition in range(40):
        half = np.sort(rng.choice(images, images // 2, replace=False))
        thresholds = planted.thresholds(half, q)
        spec = BootstrapSpec(200, seed=repetition)
        counts = planted.count(half, thresholds, spec.accumulator(images)({"u": thresholds}, planted.vocabulary,
                                                                           "paper"))
        boot = layer_bootstrap(planted.result(counts, thresholds), counts.blocks["u"], counts.block_truth,
                               spec.weights(counts.block_truth.shape[0]).astype(np.float64))
        lo, hi = boot.score_interval.T
        covered += (lo <= truth) & (truth <= hi)
        widths.append(hi - lo)
    assert (covered >= 36).all(), covered
    assert (np.mean(widths, axis=0) < 0.3).all()  # and the intervals say something


# ---- a run: B = 0 as before; the outputs of a bootstrap ------------------------------------------------------


def _without_times(summary: dict[str, Any]) -> dict[str, Any]:
    summary = json.loads(json.dumps(summary))
    summary.pop("seconds")
    summary["provenance"].pop("started")
    for layer in summary["layers"]:
        layer.pop("seconds")
    return summary


@pytest.fixture(scope="module")
def runs(broden: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    options = dict(dataset=str(broden), layers=["1", "2"], quantile=0.15, workers=0, batch_size=6,
                   reporters=["tally", "thresholds", "html"])
    for name, extra in (("plain", {}), ("zero", {"bootstrap": 0, "bootstrap_seed": 9}),
                        ("boot", {"bootstrap": 40, "bootstrap_seed": 1})):
        netdissection.dissect(tiny_model(), out=root / name, **options, **extra)  # type: ignore[arg-type]
    return {name: root / name for name in ("plain", "zero", "boot")}


def test_no_resamples_give_todays_outputs(runs: dict[str, Path]) -> None:
    for layer in ("1", "2"):
        for name in ("tally.csv", "thresholds.csv", "counts.npz"):
            assert (runs["zero"] / layer / name).read_bytes() == (runs["plain"] / layer / name).read_bytes()
    summaries = [json.loads((runs[n] / "summary.json").read_text()) for n in ("plain", "zero")]
    assert _without_times(summaries[0]) == _without_times(summaries[1])
    assert "bootstrap" not in summaries[0]["provenance"] and "bootstrap" not in summaries[0]["layers"][0]


def test_a_bootstrap_adds_columns_intervals_and_provenance(runs: dict[str, Path]) -> None:
    plain = json.loads((runs["plain"] / "summary.json").read_text())
    boot = json.loads((runs["boot"] / "summary.json").read_text())
    provenance = boot["provenance"].pop("bootstrap")
    assert provenance["resamples"] == 40 and provenance["seed"] == 1 and provenance["blocks"] == 20
    assert "permutation(20)" in provenance["assignment"]
    for entry in boot["layers"]:
        intervals = entry.pop("bootstrap")
        assert intervals["resamples"] == 40 and intervals["blocks"] == 20
        for key in ("detectors", "unique_labels", "paper_unique_labels_total"):
            lo, hi = intervals["intervals"][key]
            assert lo <= hi
        assert set(intervals["intervals"]["paper_unique_labels_by_category"]) == set(boot["vocabulary"]["categories"])
    assert _without_times(boot) == _without_times(plain)  # every number of the run itself is the same

    result = netdissection.load_results(runs["boot"])
    for layer in ("1", "2"):
        before = (runs["plain"] / layer / "tally.csv").read_text().splitlines()
        rows = list(csv.reader((runs["boot"] / layer / "tally.csv").read_text().splitlines()))
        header = tally_header(result.layers[layer].vocabulary.categories)
        assert rows[0] == header + BOOTSTRAP_COLUMNS
        # NetDissect's columns first and unchanged: a script that reads them sees the same file.
        assert [",".join(r[: len(header)]) for r in rows] == [line for line in before]
        boot_layer = result.layers[layer].bootstrap
        assert boot_layer is not None
        for row in rows[1:]:
            u = int(row[0]) - 1
            lo, hi, label, status = (float(v) for v in row[len(header):])
            assert (lo, hi) == tuple(boot_layer.score_interval[u])
            assert 0 <= lo <= hi <= 1 and 0 <= label <= 1 and status == boot_layer.detector_stability[u]
        assert sum(float(r[-1]) < STABLE for r in rows[1:]) == int(boot_layer.unstable.sum())


def test_reports_rebuilt_from_the_saved_run_keep_the_intervals(runs: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "again"
    netdissection.write_reports(netdissection.load_results(runs["boot"]), again, reporters=["tally"])
    for layer in ("1", "2"):
        assert (again / layer / "tally.csv").read_bytes() == (runs["boot"] / layer / "tally.csv").read_bytes()
    saved = json.loads((runs["boot"] / "summary.json").read_text())
    rebuilt = json.loads((again / "summary.json").read_text())
    assert [e["bootstrap"] for e in rebuilt["layers"]] == [e["bootstrap"] for e in saved["layers"]]


def test_the_html_report_and_the_terminal_show_the_intervals(runs: dict[str, Path]) -> None:
    page = (runs["boot"] / "report.html").read_text()
    summary = json.loads((runs["boot"] / "summary.json").read_text())
    unstable = sum(len(layer["bootstrap"]["unstable_units"]) for layer in summary["layers"])
    assert page.count('<span class="unstable"') == unstable
    assert len(re.findall(r'<div class="card [^"]*\bunstable\b', page)) == unstable
    assert page.count('<p class="bootstrap">') == 2
    lo, hi = summary["layers"][0]["bootstrap"]["intervals"]["detectors"]
    assert f'<span class="ci">({lo}–{hi})</span>' in page
    assert re.search(r'<span class="ci" title="95% interval of the best IoU over 40 resamples">\[0\.\d{3}, '
                     r"[01]\.\d{3}\]</span>", page)
    plain = (runs["plain"] / "report.html").read_text()
    assert 'class="ci"' not in plain and "unstable" not in plain

    console = Console(record=True, width=100)
    print_summary(console, netdissection.load_results(runs["boot"]), runs["boot"])
    text = console.export_text()
    assert f"95% intervals over 40 resamples (20 blocks): detectors {lo}–{hi}" in text


# ---- the job key and bad input ------------------------------------------------------------------------------------


def test_the_bootstrap_enters_the_job_key_only_when_on(broden: Path) -> None:
    host = netdissection.build_host()
    rule = {"name": "quantile", "params": {"q": 0.005}}

    def key(**options: Any) -> str:
        return key_of(key_material(Job(model="resnet18", dataset=str(broden), **options), host, rule))

    plain = key()
    assert key(bootstrap=0, bootstrap_seed=5) == plain  # a run without resamples keeps today's key
    keys = {key(bootstrap=200), key(bootstrap=200, bootstrap_seed=1), key(bootstrap=100)}
    assert len(keys) == 3 and plain not in keys


@pytest.mark.parametrize(("args", "needles"), [
    (["--bootstrap", "-1"], ["--bootstrap", "-1"]),
    (["--bootstrap", "5"], ["--bootstrap 5", "at least 20"]),
    (["--bootstrap", "200", "--bootstrap-seed", "-3"], ["--bootstrap-seed", "-3"]),
])
def test_bad_bootstrap_options_are_one_line(run_cli: Any, broden: Path, tmp_path: Path, args: list[str],
                                            needles: list[str]) -> None:
    for command in (["resnet18"], ["compare", "resnet18", "--out", tmp_path / "cmp"]):
        code, _, err = run_cli(*command, "--dataset", broden, *args)
        assert_one_line_error(code, err, *needles)


@pytest.mark.slow
def test_compare_and_the_store_key_the_bootstrap(run_cli: Any, tmp_path: Path) -> None:
    """``dissect compare --bootstrap`` (lite semantics: its counts are sums over images too): the run has its
    intervals; the same options come from the store, another seed is computed anew."""
    data = generate_concept_set(tmp_path / "set", images=12, image_size=64, seed=0)
    args = ["compare", "timm:test_resnet", "--dataset", data, "--workers", "0", "--store", tmp_path / "store",
            "--report", "tally", "--compat", "lite", "--bootstrap", "20"]
    code, out, err = run_cli(*args, "--out", tmp_path / "a")
    assert code == 0, err
    runs = list((tmp_path / "a" / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["provenance"]["semantics"] == "lite" and summary["provenance"]["bootstrap"]["resamples"] == 20
    tally = next(runs[0].glob("*/tally.csv")).read_text().splitlines()[0]
    assert tally.endswith(",".join(BOOTSTRAP_COLUMNS))
    code, out, err = run_cli(*args, "--out", tmp_path / "b")
    assert code == 0 and "0 computed, 1 from the store" in out, out
    code, out, err = run_cli(*args, "--bootstrap-seed", "1", "--out", tmp_path / "c")
    assert code == 0 and "1 computed, 0 from the store" in out, out
