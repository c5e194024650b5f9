"""Training dynamics: the example CNN, trained on the generated concept set with two settings, has more
unique detectors after training than at initialisation; several checkpoint series in one comparison, each
with its labels, drawn with one line per group."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from netdissection.compare.commands import series_of
from netdissection.compare.specs import CheckpointSeries, ModelSpec, read_models_file, with_series
from netdissection.core.errors import DissectionError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_small_cnn.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_small_cnn", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_labels_belong_to_the_checkpoints_before_them() -> None:
    order = ["labels", "checkpoints", "labels", "labels", "rotate", "checkpoints", "labels"]
    series, common = series_of(["a/*.pt,random", "b/*.pt"], ["arch=tiny", "dropout=0", "bn=on", "dropout=0.5"],
                               order)
    assert common == ["arch=tiny"]
    assert series == [CheckpointSeries(("a/*.pt", "random"), {"dropout": "0", "bn": "on"}),
                      CheckpointSeries(("b/*.pt",), {"dropout": "0.5"})]
    assert series_of([], ["k=v"], ["labels"]) == ([], ["k=v"])


def test_series_from_the_command_line_and_a_models_file(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for epoch in (0, 1, 2):
            (tmp_path / name / f"epoch_{epoch}.pt").write_bytes(b"")
    specs = with_series([ModelSpec("test_resnet", labels={"arch": "tiny"})],
                        [CheckpointSeries((f"{tmp_path}/a/epoch_*.pt", "random"), {"dropout": "0"}),
                         CheckpointSeries((f"{tmp_path}/b/epoch_*.pt",), {"dropout": "0.5"})])
    assert [(s.x, s.labels) for s in specs] == [
        (None, {"arch": "tiny", "dropout": "0"}), *((x, {"arch": "tiny", "dropout": "0"}) for x in (0, 1, 2)),
        *((x, {"arch": "tiny", "dropout": "0.5"}) for x in (0, 1, 2))]
    # The same two series as lines of a models file (paths relative to the file).
    models = tmp_path / "models.txt"
    models.write_text("test_resnet --checkpoints 'a/epoch_*.pt,random' --label dropout=0\n"
                      "test_resnet --checkpoints b/epoch_*.pt --label dropout=0.5  # the regularised run\n")
    from_file = with_series(read_models_file(models), [])
    assert [(s.x, s.labels, s.weights) for s in from_file] == [(s.x, {k: v for k, v in s.labels.items() if k != "arch"},
                                                                s.weights) for s in specs]
    with pytest.raises(DissectionError, match="one architecture"):
        with_series([ModelSpec("a"), ModelSpec("b")], [f"{tmp_path}/a/epoch_*.pt"])
    models.write_text("test_resnet --checkpoints 'a/*.pt' --weights a/epoch_0.pt\n")
    with pytest.raises(DissectionError, match="drop --weights"):
        read_models_file(models)


@pytest.mark.slow
def test_detectors_emerge_over_training_in_two_settings(run_cli: Any, tmp_path: Path) -> None:
    from netdissection.compare.plots import curve_panels, x_series
    from netdissection.compare.rows import categories_of

    example = load_example()
    out = tmp_path / "small_cnn"
    # The README's example at reduced scale: 96 training images of 64 px, 3 epochs, two dropout settings.
    folders = example.main(["--out", str(out), "--train-images", "96", "--dissect-images", "48", "--size", "64",
                            "--epochs", "3"])
    assert [f.name for f in folders] == ["dropout_0", "dropout_0.5"]
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == [f"epoch_{e}.pt" for e in range(4)]
    # Both settings start from the same weights: one job, the second read from the store.
    assert (folders[0] / "epoch_0.pt").read_bytes() == (folders[1] / "epoch_0.pt").read_bytes()

    cmp = tmp_path / "cmp"
    # The initial weights and the last epoch of each setting (the README compares every epoch).
    code, stdout, err = run_cli(
        "compare", "timm:test_resnet", "--dataset", out / "concepts", "--label", "arch=test_resnet",
        "--checkpoints", f"{folders[0]}/epoch_[03].pt", "--label", "dropout=0",
        "--checkpoints", f"{folders[1]}/epoch_[03].pt", "--label", "dropout=0.5",
        "--workers", "0", "--out", cmp, "--store", tmp_path / "store", "--report", "tally")
    assert code == 0, err
    assert "3 computed, 1 from the store" in stdout
    rows = json.loads((cmp / "compare.json").read_text())["rows"]
    assert [(r["labels"]["dropout"], r["x"]) for r in rows] == [(d, x) for d in ("0", "0.5") for x in (0, 3)]
    assert all(r["labels"]["arch"] == "test_resnet" for r in rows)
    for setting in ("0", "0.5"):
        series = [r for r in rows if r["labels"]["dropout"] == setting]
        init, trained = series[0], series[-1]
        # More unique detectors (concepts) after training than at initialisation, by both rules.
        assert trained["unique"] > init["unique"], [(r["x"], r["unique"]) for r in series]
        assert trained["paper_unique"] > init["paper_unique"], [(r["x"], r["paper_unique"]) for r in series]

    # The plot: one series per setting, and each panel has one line per group.
    series = x_series(rows)
    assert len(series) == 2
    categories = categories_of(rows)
    panels = curve_panels(series, categories)
    assert len(panels) == 2 + len(categories)
    for panel in panels:
        assert [c.label for c in panel.curves] == ["dropout=0", "dropout=0.5"]
        assert all(c.xs == [0, 3] for c in panel.curves)
    assert panels[0].curves[1].ys == [float(r["detectors"]) for r in rows[2:]]
    svg = (cmp / "detectors_vs_x.svg").read_text()
    assert "dropout=0.5" in svg and "dropout=0<" in svg.replace("dropout=0.5", "")
