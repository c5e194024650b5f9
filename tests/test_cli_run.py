"""`dissect MODEL` end to end through the CLI, and the files a user opens afterwards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import netdissection
from netdissection.plugins.datasets.generated import generate_concept_set


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=16, image_size=64, seed=0)


def test_dissect_writes_netdissect_results(run_cli, concept_set: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code, stdout, err = run_cli("resnet18", "--dataset", concept_set, "--layer", "layer3", "--layer", "layer2",
                                "--out", out, "--categories", "object,color,part", "--workers", "0")
    assert code == 0, err
    for layer, units in (("layer3", 256), ("layer2", 128)):
        with open(out / layer / "tally.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == units
        assert list(rows[0])[:4] == ["unit", "category", "label", "score"]
        assert [h for h in rows[0] if h.endswith("-iou")] == ["object-iou", "color-iou", "part-iou"]
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert sorted(int(r["unit"]) for r in rows) == list(range(1, units + 1))
        with open(out / layer / "thresholds.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == units
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["model"] == "resnet18"
    assert summary["provenance"]["backend"] == "torchvision"
    rule = summary["provenance"]["threshold_rule"]
    assert (rule["name"], rule["plugin"]) == ("quantile", "quantile")
    # Every parameter is recorded, defaults included; the implementation's memory knobs change no number.
    assert {k: rule["params"][k] for k in ("q", "compat")} == {"q": 0.005, "compat": "paper"}
    assert summary["provenance"]["dataset"]["categories"] == ["object", "color", "part"]
    assert "torchvision_backend" in summary["provenance"]["plugins"]
    assert [entry["layer"] for entry in summary["layers"]] == ["layer3", "layer2"]
    assert summary["images"] == 16
    # The terminal summary names each layer and its detector count.
    assert "layer3:" in stdout and "units are detectors" in stdout


def test_default_layer_is_the_last_spatial_one(run_cli, concept_set: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--dataset", concept_set, "--out", tmp_path / "o", "--workers", "1")
    assert code == 0, err
    assert (tmp_path / "o" / "layer4" / "tally.csv").is_file()
    code, out, _ = run_cli("layers", "resnet18")
    assert code == 0
    assert "layer4  (default)" in out and "fc" not in out


def test_results_load_back_identically(concept_set: Path, tmp_path: Path) -> None:
    import numpy as np
    import torch
    import torchvision

    torch.manual_seed(0)
    result = netdissection.dissect(torchvision.models.resnet18(), dataset=str(concept_set), layers=["layer3"],
                                   out=tmp_path / "o", workers=0)
    loaded = netdissection.load_results(tmp_path / "o")
    a, b = result.layers["layer3"], loaded.layers["layer3"]
    for name in ("thresholds", "intersection", "truth", "activation"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.top_images is not None and b.top_images is not None
    np.testing.assert_array_equal(a.top_images.indices, b.top_images.indices)
    assert loaded.provenance["model"] == "ResNet"


def test_lifecycle_hooks_fire_in_order(concept_set: Path, tmp_path: Path) -> None:
    from torch import nn

    from netdissection.registry import build_host

    events: list[str] = []

    class Listener:
        __name__ = "listener"

        @netdissection.hookimpl
        def dissect_run_start(self, run):  # type: ignore[no-untyped-def]
            events.append("run_start")

        @netdissection.hookimpl
        def dissect_layer_start(self, run, layer):  # type: ignore[no-untyped-def]
            events.append(f"layer_start:{layer}")

        @netdissection.hookimpl
        def dissect_layer_finish(self, run, result):  # type: ignore[no-untyped-def]
            events.append(f"layer_finish:{result.layer}")

        @netdissection.hookimpl
        def dissect_run_finish(self, run, result):  # type: ignore[no-untyped-def]
            events.append("run_finish")

        @netdissection.hookimpl
        def dissect_run_error(self, run, error):  # type: ignore[no-untyped-def]
            events.append(f"run_error:{type(error).__name__}")

    host = build_host(entry_points=False, extra_plugins=(Listener(),))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())
    netdissection.dissect(model, dataset=str(concept_set), layers=["0", "1"], host=host, workers=0)
    assert events == ["run_start", "layer_start:0", "layer_start:1", "layer_finish:0", "layer_finish:1",
                      "run_finish"]
    events.clear()
    (concept_set / "images" / "gen" / "000003.jpg").rename(concept_set / "missing.jpg")
    try:
        with pytest.raises(netdissection.DissectionError, match=r"000003\.jpg"):
            netdissection.dissect(model, dataset=str(concept_set), layers=["0"], host=host, workers=0)
    finally:
        (concept_set / "missing.jpg").rename(concept_set / "images" / "gen" / "000003.jpg")
    assert events[-1] == "run_error:DissectionError"


def test_random_weights_are_reproducible(concept_set: Path, tmp_path: Path) -> None:
    """Without weights, the same model name gives the same numbers run after run (seeded init)."""
    import numpy as np

    first = netdissection.dissect("resnet18", dataset=str(concept_set), layers=["layer2"], workers=0)
    second = netdissection.dissect("resnet18", dataset=str(concept_set), layers=["layer2"], workers=0)
    np.testing.assert_array_equal(first.layers["layer2"].thresholds, second.layers["layer2"].thresholds)
    assert first.provenance["backend_details"]["random_init_seed"] == 0
