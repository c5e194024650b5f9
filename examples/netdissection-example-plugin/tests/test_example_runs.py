"""The installed example plugin used for real: every component in one `dissect` run from the command line and
through `netdissection.dissect`, the fixed rule's tally checked against the testing kit's brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from netdissection_example.npz_dataset import NpzDataset
from netdissection_example.torchscript import TorchScriptBackend

import netdissection
from netdissection.testing import reference_counts, reference_maps


@pytest.fixture(scope="module")
def files(torchscript_file: Path, tiny_broden_set: Path) -> dict[str, Path]:
    return {"model": torchscript_file, "broden": tiny_broden_set}


@pytest.fixture(scope="module")
def fixed_value(files: dict[str, Path]) -> float:
    """A threshold inside the range of conv2's maps on the concept set (about its 90th percentile)."""
    maps = reference_maps(TorchScriptBackend(files["model"], netdissection.BackendOptions()),
                          netdissection.open_dataset(files["broden"], format="broden"), "conv2")
    return round(float(np.quantile(maps, 0.9)), 4)


def test_the_installed_plugin_is_listed(dissect_cli) -> None:  # type: ignore[no-untyped-def]
    result = dissect_cli("plugins", "--json")
    assert result.exit_code == 0, result.stderr
    example = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "example")
    assert example["source"] == "netdissection-example-plugin" and example["status"] == "ok"
    assert example["provides"] == ["backend:torchscript", "dataset:npz", "threshold:fixed", "reporter:markdown",
                                   "command:npz-info"]


def test_every_component_in_one_cli_run(dissect_cli, files: dict[str, Path], fixed_value: float,  # type: ignore[no-untyped-def]
                                        tmp_path: Path) -> None:
    npz = tmp_path / "set.npz"
    converted = dissect_cli("data", "convert", files["broden"], npz, "--format", "npz")
    assert converted.exit_code == 0, converted.stderr
    info = dissect_cli("npz-info", npz)
    assert info.exit_code == 0, info.stderr
    assert "npz concept set, 12 images of 32×32 px" in info.stdout and "color" in info.stdout

    out = tmp_path / "out"
    # The backend and the dataset format are detected from the file names.
    run = dissect_cli(files["model"], "--dataset", npz, "--layer", "conv2", "--threshold", "fixed",
                      "--threshold-param", f"value={fixed_value}", "--report", "tally,markdown", "--workers", "0",
                      "--out", out)
    assert run.exit_code == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    provenance = summary["provenance"]
    assert provenance["backend"] == "torchscript" and provenance["dataset"]["format"] == "npz"
    assert provenance["threshold_rule"] == {"name": "fixed", "plugin": "example", "params": {"value": fixed_value}}
    assert "example" in provenance["plugins"]
    assert sorted(summary["written"]) == ["conv2/counts.npz", "conv2/tally.csv", "report.md", "summary.json"]
    assert "threshold rule: fixed (value=" in (out / "report.md").read_text()

    # The tally a fixed threshold gives, checked against the brute force.
    layer = netdissection.load_results(out).layers["conv2"]
    np.testing.assert_array_equal(layer.thresholds, np.full(16, fixed_value))
    dataset = NpzDataset(npz)
    maps = reference_maps(TorchScriptBackend(files["model"], netdissection.BackendOptions()), dataset, "conv2")
    expected = reference_counts(maps, dataset, layer.thresholds)
    np.testing.assert_array_equal(layer.intersection, expected.intersection)
    np.testing.assert_array_equal(layer.truth, expected.truth)
    np.testing.assert_array_equal(layer.activation, expected.activation)
    assert expected.intersection.sum() > 0


def test_every_component_through_the_python_api(files: dict[str, Path], npz_file: Path, fixed_value: float,
                                                tmp_path: Path) -> None:
    npz = npz_file
    fixed = netdissection.dissect(str(files["model"]), dataset=str(npz), layers=["conv2"], threshold="fixed",
                                  threshold_params={"value": fixed_value}, reporters=["markdown"],
                                  out=tmp_path / "out", workers=0)
    assert fixed.provenance["backend"] == "torchscript"
    assert fixed.provenance["threshold_rule"]["name"] == "fixed"
    assert (tmp_path / "out" / "report.md").is_file()
    # The rule changes the thresholds and the tally: the default rule (the paper's quantile) gives others.
    quantile = netdissection.dissect(str(files["model"]), dataset=str(npz), layers=["conv2"], workers=0)
    assert not np.array_equal(quantile.layers["conv2"].thresholds, fixed.layers["conv2"].thresholds)
    assert not np.array_equal(quantile.layers["conv2"].intersection, fixed.layers["conv2"].intersection)
