"""`dissect compare` end to end: the table equals each model's own run, checkpoint series, resume after
SIGKILL, the store behind `dissect MODEL`, published tallies, failure isolation and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import netdissection
from netdissection.core.reporting import summary_of
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error
from .test_golden import GOLDEN, TABLE

RunCli = Callable[..., tuple[int, str, str]]
SMALL = ("timm:test_resnet", "timm:test_vit", "timm:test_convnext", "timm:test_efficientnet")


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=12, image_size=64, seed=0)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def own_run(model: str, concept_set: Path, **options: Any) -> dict[str, Any]:
    """The model's own `dissect` run (no store), as its summary, with each layer's map shape."""
    result = netdissection.dissect(model, dataset=str(concept_set), workers=0, reporters=["tally"], **options)
    summary = summary_of(result)
    for entry in summary["layers"]:
        maps = result.layers[entry["layer"]].top_images.maps
        entry["shape"] = [entry["units"], int(maps.shape[-2]), int(maps.shape[-1])]
    return summary


def assert_row_equals_run(row: dict[str, Any], entry: dict[str, Any], summary: dict[str, Any]) -> None:
    assert row["status"] == "ok"
    assert row["units"] == entry["units"]
    assert row["detectors"] == entry["detectors"]
    assert row["unique"] == entry["unique_labels"]
    assert row["paper_unique"] == entry["paper_unique_labels_total"]
    assert row["mean_iou"] == pytest.approx(entry["mean_iou_of_detectors"], rel=1e-12)
    assert row["images"] == summary["images"]
    assert row["map"] == entry["shape"]
    for category in summary["vocabulary"]["categories"]:
        assert row[f"{category}_detectors"] == entry["detectors_by_category"][category]
        assert row[f"{category}_unique"] == entry["unique_labels_by_category"][category]
        assert row[f"{category}_paper_units"] == entry["paper_units_by_category"][category]
        assert row[f"{category}_paper_unique"] == entry["paper_unique_labels_by_category"][category]


@pytest.mark.slow
@pytest.mark.parametrize("layer", [None, "stage:-1"])
def test_four_architectures_equal_their_own_runs(run_cli: RunCli, concept_set: Path, tmp_path: Path,
                                                 layer: str | None) -> None:
    """A CNN, a ViT, a ConvNeXt and an EfficientNet (timm, seeded random weights), default layer and stage:-1."""
    models = ("timm:resnet10t", "timm:vit_tiny_patch16_224", "timm:convnext_atto", "timm:efficientnet_b0")
    out = tmp_path / "cmp"
    args = ["compare", *models, "--dataset", concept_set, "--workers", "0", "--out", out, "--store",
            tmp_path / "store", "--report", "tally"]
    code, stdout, err = run_cli(*args, *(["--layer", layer] if layer else []))
    assert code == 0, err
    rows = read_json(out / "compare.json")["rows"]
    assert [r["model"] for r in rows] == [m.split(":", 1)[1] for m in models]
    for model, row in zip(models, rows, strict=True):
        summary = own_run(model.split(":", 1)[1], concept_set, backend="timm", layers=[layer] if layer else None)
        (entry,) = summary["layers"]
        assert_row_equals_run(row, entry, summary)
        details = summary["provenance"]["backend_details"]
        assert row["backend"] == "timm" and row["weights"] == "random (seed 0)"
        assert row["layer"] == entry["layer"]
        # The resolved module of a stage alias, from the backend's own stage list.
        if layer == "stage:-1":
            assert row["module"] == list(details["stages"].values())[-1]
        assert row["run"] == f"runs/{row['model']}"
        assert (out / row["run"] / "summary.json").is_file()
        assert read_json(out / row["run"] / "summary.json")["random_weights"] == {"seed": 0}
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["detectors"]) for r in table] == [r["detectors"] for r in rows]
    assert table[0]["map"] == "x".join(str(v) for v in rows[0]["map"])
    assert (out / "unique_detectors_by_model.svg").is_file() and (out / "unique_detectors_by_model.png").is_file()
    page = (out / "index.html").read_text()
    assert 'class="sortable"' in page and "unique_detectors_by_model.svg" in page
    # Each model is in the terminal table, with its layer.
    for row in rows:
        assert row["model"] in stdout


def _train_checkpoints(concept_set: Path, folder: Path, epochs: int = 3) -> list[Path]:
    """timm's test_resnet trained for a few epochs to tell the scenes of the generated set apart, saved per
    epoch (a real, if tiny, training run)."""
    import numpy as np
    import timm
    import torch

    from netdissection.plugins.datasets.broden import BrodenDataset

    data = BrodenDataset(concept_set)
    samples = [data.load(i) for i in range(len(data))]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    targets = torch.tensor([s.image_labels[0] if s.image_labels else 0 for s in samples])
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    folder.mkdir()
    saved = []
    for epoch in range(1, epochs + 1):
        model.train()
        for start in range(0, len(images), 4):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[start:start + 4]), targets[start:start + 4])
            loss.backward()
            optimiser.step()
        path = folder / f"epoch_{epoch}.pt"
        torch.save(model.state_dict(), path)
        saved.append(path)
    return saved


@pytest.mark.slow
def test_checkpoint_series(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    from netdissection.compare.plots import x_series

    checkpoints = _train_checkpoints(concept_set, tmp_path / "ckpt")
    out = tmp_path / "cmp"
    code, _, err = run_cli("compare", "timm:test_resnet", "--checkpoints", f"{tmp_path / 'ckpt'}/epoch_*.pt,random",
                           "--dataset", concept_set, "--workers", "0", "--out", out, "--store", tmp_path / "store",
                           "--report", "tally")
    assert code == 0, err
    rows = read_json(out / "compare.json")["rows"]
    assert [r["x"] for r in rows] == [None, 1, 2, 3]
    assert rows[0]["weights"] == "random (seed 0)" and rows[0]["model"] == "test_resnet (random)"
    assert [r["weights"] for r in rows[1:]] == [str(p) for p in checkpoints]
    # The numbers of each checkpoint equal its own run.
    for row, weights in zip(rows, [None, *checkpoints], strict=True):
        summary = own_run("test_resnet", concept_set, backend="timm", weights=str(weights) if weights else None)
        assert_row_equals_run(row, summary["layers"][0], summary)
        assert summary["random_weights"] == (None if weights else {"seed": 0})
    # The detectors-vs-x plot: one series, x = the epochs, the random model as its baseline.
    series = x_series(rows)
    (group,) = series.values()
    assert [r["x"] for r in group["points"]] == [1, 2, 3] and group["baseline"] is rows[0]
    assert (out / "detectors_vs_x.svg").is_file() and (out / "detectors_vs_x.png").is_file()
    svg = (out / "detectors_vs_x.svg").read_text()
    assert "random weights" in svg and "report rule" in svg and "paper rule" in svg
    # The x axis of each panel is labelled with the epochs (the plots keep text as text).
    labels = re.findall(r'font-size: 8px;[^"]*text-anchor: middle"[^>]*>([^<]+)</text>', svg)
    assert [t for t in labels if re.fullmatch(r"[\d.]+", t)] == ["1", "2", "3", "1", "2", "3"]


def test_x_axis_scale() -> None:
    from netdissection.compare.plots import x_scale

    assert x_scale([1, 2, 3]) == "linear"
    assert x_scale([1, 10, 100, 1000]) == "log"
    assert x_scale([0, 10, 1000, 100000]) == "symlog"


def _job_count(store: Path) -> int:
    jobs = store / "jobs"
    return len(list(jobs.iterdir())) if jobs.is_dir() else 0


@pytest.mark.slow
def test_resume_after_sigkill_computes_only_the_rest(concept_set: Path, tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "cmp"
    args = [sys.executable, "-m", "netdissection.cli", "compare", *SMALL, "--dataset", str(concept_set), "--workers",
            "0", "--out", str(out), "--store", str(store)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "COLUMNS": "120"})
    deadline = time.monotonic() + 240
    try:
        # The third job is running when two are finished and one is being computed.
        while not (_job_count(store) == 2 and any((store / "staging").glob("*"))):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert _job_count(store) == 2  # nothing of the third job looks finished
    assert not (out / "compare.json").exists()

    class StartedRuns:
        def __init__(self) -> None:
            self.models: list[str] = []

        @netdissection.hookimpl
        def dissect_run_start(self, run: dict[str, Any]) -> None:
            self.models.append(run["model"])

    from netdissection.registry import build_host

    started = StartedRuns()
    table = netdissection.compare(list(SMALL), dataset=concept_set, workers=0, out=out, store=store,
                                  host=build_host(extra_plugins=(started,)))
    assert started.models == ["test_convnext", "test_efficientnet"]  # only models 3 and 4 ran
    assert [o.cached for o in table.outcomes] == [True, True, False, False]
    # The same table as a compare that was never interrupted.
    whole = netdissection.compare(list(SMALL), dataset=concept_set, workers=0, out=tmp_path / "whole",
                                  store=tmp_path / "store2")

    def numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in ("seconds", "cached")} for r in rows]

    assert numbers(list(table)) == numbers(list(whole))
    # Each run has its report (linked from index.html), not the per-layer plots the comparison's plots replace.
    for row in table:
        assert (out / row["run"] / "report.html").is_file()
        assert not list((out / row["run"]).rglob("unique_detectors.svg"))
    assert numbers(read_json(out / "compare.json")["rows"]) == numbers(read_json(tmp_path / "whole" / "compare.json")
                                                                       ["rows"])
    # The killed job's staging folder (its activation cache with it) went when the next job began.
    assert list((store / "staging").iterdir()) == []
    from netdissection.cli import main

    main(["cache", "gc", "--store", str(store)])
    assert _job_count(store) == 4


_NO_TORCH = """
import sys
from netdissection.cli import main
main(sys.argv[1:])
assert "torch" not in sys.modules, "a framework was imported: the model ran"
print("NO-FORWARD-PASS")
"""


def test_repeated_single_run_reads_the_store(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = ["test_convnext", "--backend", "timm", "--dataset", str(concept_set), "--workers", "0",
              "--store", str(store)]
    code, stdout, err = run_cli(*common, "--out", tmp_path / "first")
    assert code == 0, err
    assert "random weights, seed 0: not a trained model" in stdout
    first = read_json(tmp_path / "first" / "summary.json")
    assert first["random_weights"] == {"seed": 0}
    assert "random weights, seed 0: not a trained model" in (tmp_path / "first" / "report.html").read_text()
    # The same run again, in a fresh process: from the store, with no framework imported.
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *common, "--out", str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NO-FORWARD-PASS" in done.stdout and "from the results store" in done.stdout
    again = tmp_path / "again"
    assert read_json(again / "summary.json") == first
    for name in first["written"]:
        assert (again / name).exists(), name
        if (again / name).is_file():
            assert (again / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    # Rebuilding the reports in the copy leaves the store's entry intact.
    code, _, err = run_cli("report", again, "--report", "tally")
    assert code == 0, err
    code, _, err = run_cli(*common, "--out", tmp_path / "third")
    assert code == 0 and "corrupt" not in err
    # The stored run's plots are SVG only: asked for PNG copies, the plots are drawn again from its counts.
    svgs = [name for name in first["written"] if name.endswith(".svg")]
    assert svgs and not any(name.endswith(".png") for name in first["written"])
    code, stdout, err = run_cli(*common, "--out", tmp_path / "fourth", "--plot-format", "png")
    assert code == 0 and "from the results store" in stdout, err
    written = read_json(tmp_path / "fourth" / "summary.json")["written"]
    assert set(first["written"]) <= set(written)  # the stored run's files, and the new copies
    for svg in svgs:
        png = svg.removesuffix(".svg") + ".png"
        assert png in written and Image.open(tmp_path / "fourth" / png).size[0] > 500, png
    # ... and the same from the saved results with `dissect report`, as PDF.
    code, _, err = run_cli("report", tmp_path / "third", "--plot-format", "pdf")
    assert code == 0, err
    for svg in svgs:
        assert (tmp_path / "third" / svg).with_suffix(".pdf").read_bytes().startswith(b"%PDF-"), svg
    # ... and in a comparison, whose runs then draw the plots they leave out by default (this one from the store).
    code, stdout, err = run_cli("compare", *common, "--out", tmp_path / "cmp", "--plot-format", "png")
    assert code == 0 and "1 from the store" in stdout, err
    (run,) = [path for path in (tmp_path / "cmp" / "runs").iterdir() if path.is_dir()]
    for svg in svgs:
        assert Image.open(run / (svg.removesuffix(".svg") + ".png")).size[0] > 500, svg


def test_corrupt_store_entry_is_recomputed_with_a_warning(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = ["test_efficientnet", "--backend", "timm", "--dataset", concept_set, "--workers", "0", "--store", store,
              "--report", "tally", "--out", tmp_path / "out"]
    code, _, err = run_cli(*common)
    assert code == 0, err
    (entry,) = (store / "jobs").iterdir()
    tally = next(entry.glob("run/*/tally.csv"))
    original = tally.read_text()
    tally.write_text(original.replace("0.", "9.", 1))
    code, stdout, err = run_cli(*common)
    assert code == 0, err
    assert "corrupt" in err and "computing it again" in err and "tally.csv has changed" in err
    assert "from the results store" not in stdout
    assert tally.read_text() == original  # computed again: the same numbers


def test_published_tallies_as_rows(run_cli: RunCli, tmp_path: Path) -> None:
    args = [f"--add-tally={name.removesuffix('.csv')}={GOLDEN / name}" for name in sorted(TABLE)]
    code, stdout, err = run_cli("compare", *args, "--out", tmp_path / "cmp", "--no-store")
    assert code == 0, err
    rows = read_json(tmp_path / "cmp" / "compare.json")["rows"]
    for row, name in zip(rows, sorted(TABLE), strict=True):
        units, detectors, unique, per_category = TABLE[name]
        assert row["status"] == "tally" and row["model"] == name.removesuffix(".csv")
        assert (row["units"], row["detectors"], row["unique"]) == (units, detectors, unique)
        assert {c: row[f"{c}_paper_unique"] for c in per_category} == per_category
        assert row["paper_unique"] == sum(per_category.values())
    assert "1452" in stdout and "1325" in stdout  # the published detector counts, in the terminal table


def test_a_failing_model_is_a_row_and_the_others_go_on(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    models = tmp_path / "models.txt"
    models.write_text("# two models, one with a broken checkpoint\n"
                      "timm:test_convnext --label kind=ok\n"
                      "timm:test_vit --weights broken.pt  # relative to this file\n")
    out = tmp_path / "cmp"
    code, _, err = run_cli("compare", "--models-file", models, "--dataset", concept_set, "--workers", "0", "--out",
                           out, "--store", tmp_path / "store", "--report", "tally")
    assert code == 1, err
    rows = read_json(out / "compare.json")["rows"]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["labels"] == {"kind": "ok"}
    assert "broken.pt" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert "1 of 2 jobs failed" in err
    assert _job_count(tmp_path / "store") == 1  # nothing of the failed job in the store


def test_python_api_table(concept_set: Path, tmp_path: Path) -> None:
    table = netdissection.compare("timm:test_convnext", dataset=concept_set, workers=0, store=tmp_path / "store",
                                  layers=["stage:*"], labels={"run": "a"}, reporters=["tally"])
    assert [r["layer"] for r in table] == ["stage:0", "stage:1", "stage:2", "stage:3"]
    assert [r["module"] for r in table] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert all(r["labels"] == {"run": "a"} for r in table)
    assert table.out is None and not table.failed
    frame = table.to_pandas()
    assert list(frame["detectors"]) == [r["detectors"] for r in table]
    # Written afterwards from the store: nothing computed, per-layer plot drawn.
    again = netdissection.compare("timm:test_convnext", dataset=concept_set, workers=0, store=tmp_path / "store",
                                  layers=["stage:*"], out=tmp_path / "out")
    assert [o.cached for o in again.outcomes] == [True]
    assert (tmp_path / "out" / "detectors_by_layer.svg").is_file()


def test_import_starts_no_framework() -> None:
    code = ("import sys, netdissection, netdissection.compare.rows, netdissection.compare.execution; "
            "assert callable(netdissection.compare); assert 'torch' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_plugins_lists_the_executor(run_cli: RunCli) -> None:
    code, stdout, _ = run_cli("plugins")
    assert code == 0 and "executor:local" in stdout


def test_cache_ls_and_rm(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    code, _, err = run_cli("test_vit", "--backend", "timm", "--dataset", concept_set, "--workers", "0", "--store",
                           store, "--report", "tally", "--out", tmp_path / "out")
    assert code == 0, err
    (key,) = [p.name for p in (store / "jobs").iterdir()]
    code, stdout, _ = run_cli("cache", "ls", "--store", store)
    assert code == 0 and key[:12] in stdout and "test_vit" in stdout
    code, _, err = run_cli("cache", "rm", "zzzzzz", "--store", store)
    assert_one_line_error(code, err, "zzzzzz")
    code, stdout, _ = run_cli("cache", "rm", key[:8], "--store", store)
    assert code == 0 and "removed 1" in stdout
    assert _job_count(store) == 0


@pytest.mark.parametrize("args, needles", [
    (["timm:convnxt_at*"], ["no timm model matches 'convnxt_at*'", "convnext_atto"]),
    (["timm:test_resnet", "--checkpoints", "nowhere/epoch_*.pt"], ["'nowhere/epoch_*.pt' matches no file"]),
    (["timm:test_resnet", "--executor", "rays"], ["unknown executor 'rays'", "ray"]),
    (["timm:test_resnet", "--address", "10.0.0.1:6379"], ["--address", "local executor"]),
    (["timm:test_resnet", "--shards", "3"], ["--shards", "local executor"]),
    (["timm:test_resnet", "timm:test_vit", "--checkpoints", "x.pt"], ["one architecture"]),
    (["timm:test_resnet", "--x-from", "e(\\d+)"], ["--x-from", "--checkpoints"]),
    (["--add-tally", "paper"], ["--add-tally", "KEY=VALUE"]),
    (["no_such_model_anywhere"], ["unknown model 'no_such_model_anywhere'"]),
    ([], ["nothing to compare"]),
    (["timm:test_resnet", "--categories", "objekt"], ["unknown category 'objekt'", "object"]),
])
def test_bad_input(run_cli: RunCli, concept_set: Path, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    code, _, err = run_cli("compare", *args, "--dataset", concept_set, "--out", tmp_path / "cmp", "--store",
                           tmp_path / "store")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "cmp" / "compare.json").exists()


def test_missing_dataset(run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli("compare", "timm:test_resnet", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "nowhere", "does not exist")


def test_bad_checkpoints(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    import timm
    import torch

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(timm.create_model("test_resnet").state_dict(), folder / "epoch_1.pt")
    torch.save(timm.create_model("test_convnext").state_dict(), folder / "epoch_2.pt")
    torch.save(timm.create_model("test_resnet").state_dict(), folder / "run3_epoch_4.pt")
    common = ["compare", "timm:test_resnet", "--dataset", concept_set, "--workers", "0", "--out", tmp_path / "cmp",
              "--store", tmp_path / "store"]
    # A checkpoint of another architecture: named, before anything runs.
    code, _, err = run_cli(*common, "--checkpoints", f"{folder}/epoch_*.pt")
    assert_one_line_error(code, err, "epoch_2.pt", "does not fit test_resnet")
    assert _job_count(tmp_path / "store") == 0
    # A name with two numbers needs --x-from; with it, the series runs.
    code, _, err = run_cli(*common, "--checkpoints", f"{folder}/run3_*.pt")
    assert_one_line_error(code, err, "run3_epoch_4.pt", "--x-from")
    code, _, err = run_cli(*common, "--checkpoints", f"{folder}/run3_*.pt", "--x-from", r"epoch_(\d+)", "--report",
                           "tally")
    assert code == 0, err
    assert [r["x"] for r in read_json(tmp_path / "cmp" / "compare.json")["rows"]] == [4]


def test_models_file_errors_name_the_line(run_cli: RunCli, tmp_path: Path) -> None:
    models = tmp_path / "models.txt"
    models.write_text("timm:test_resnet\n\ntimm:test_vit --widht 2\n")
    code, _, err = run_cli("compare", "--models-file", models, "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, f"{models}:3", "--widht")
    models.write_text("timm:test_resnet --weights missing.pt\n")
    code, _, err = run_cli("compare", "--models-file", models, "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, f"{models}:1", "missing.pt")


def test_patterns_and_exclusions() -> None:
    from netdissection.compare.specs import ModelSpec, expand
    from netdissection.registry import build_host

    host = build_host()
    specs = expand([ModelSpec("timm:test_vit*")], host, exclude=["*vit3*", "timm:test_vit_relpos"])
    assert [(s.model, s.backend) for s in specs] == [("test_vit", "timm"), ("test_vit2", "timm"),
                                                      ("test_vit4", "timm")]
    # Without a prefix every backend that lists names is searched; names both know stay detected.
    both = {s.model: s.backend for s in expand([ModelSpec("resnet1[08]*")], host, exclude=["resnet10[01]*"])}
    assert both == {"resnet10t": "timm", "resnet18": None, "resnet18d": "timm"}


def test_single_run_finds_what_compare_computed(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    table = netdissection.compare("timm:test_convnext", dataset=concept_set, workers=0, store=store,
                                  layers=["stage:-1", "no_such_layer"], reporters=["tally"])
    assert [r["layer"] for r in table] == ["stage:-1"]  # applied where it exists
    # `dissect MODEL` with the same layers: the model lacks one, which is an error there, not a stored run.
    common = ["test_convnext", "--backend", "timm", "--dataset", concept_set, "--workers", "0", "--store", store]
    code, _, err = run_cli(*common, "--layer", "stage:-1", "--layer", "no_such_layer", "--out", tmp_path / "a")
    assert_one_line_error(code, err, "no_such_layer")
    # Where every layer exists, compare's run is the single run: read from the store, the missing reports added.
    netdissection.compare("timm:test_convnext", dataset=concept_set, workers=0, store=store, layers=["stage:-1"],
                          reporters=["tally"])
    code, stdout, err = run_cli(*common, "--layer", "stage:-1", "--out", tmp_path / "b")
    assert code == 0, err
    assert "from the results store" in stdout
    folder = json.loads((tmp_path / "b" / "summary.json").read_text())["layers"][0]["folder"]
    assert (tmp_path / "b" / "report.html").is_file() and (tmp_path / "b" / folder / "tally.csv").is_file()


class _ElsewhereExecutor:
    """An executor as a cluster one would be: jobs in another order, each run computed apart from the store
    (here: in memory) and handed to the context, which writes, commits and places it."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def run(self, jobs: Any, context: Any) -> Any:
        for index in reversed(range(len(jobs))):
            job = jobs[index]
            context.events.job_started(index, job, len(jobs))
            outcome = context.lookup(index, job)
            if outcome is None:
                result = netdissection.dissect(job.model, backend=job.backend, dataset=job.dataset, workers=0,
                                               layers=list(job.layers) or None)
                run_dir, staging = context.begin(index, job)
                context.write_result(job, result, run_dir)
                outcome = context.finish(index, job, run_dir, staging, result, 0.0)
            context.events.job_finished(outcome)
            yield outcome


class _ElsewherePlugin:
    @netdissection.hookimpl
    def dissect_register_executors(self, register: Any) -> None:
        register("elsewhere", _ElsewhereExecutor, description="test executor")


def test_an_executor_plugin_runs_jobs_its_own_way(concept_set: Path, tmp_path: Path) -> None:
    from netdissection.registry import build_host

    host = build_host(extra_plugins=(_ElsewherePlugin(),))
    assert "elsewhere" in host.catalog("executor")
    models = ["timm:test_vit", "timm:test_convnext"]
    table = netdissection.compare(models, dataset=concept_set, workers=0, store=tmp_path / "store", host=host,
                                  executor="elsewhere", executor_options={"shards": 2}, out=tmp_path / "cmp")
    assert [r["model"] for r in table] == ["test_vit", "test_convnext"]  # rows in job order
    local = netdissection.compare(models, dataset=concept_set, workers=0, store=tmp_path / "store", out=tmp_path / "b")
    assert [o.cached for o in local.outcomes] == [True, True]  # committed to the store like local runs
    assert [r["detectors"] for r in local] == [r["detectors"] for r in table]
    assert (tmp_path / "cmp" / "runs" / "test_vit" / "report.html").is_file()
