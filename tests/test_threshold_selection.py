"""Choosing the threshold rule and its parameters (CLI and Python), and every name checked before a pass."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import netdissection
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error


class FixedRule:
    """Every unit's threshold is ``value``; records what the host handed it."""

    seen: ClassVar[list[dict[str, object]]] = []

    def __init__(self, units: int, values_per_unit: int, *, value: float, device: str = "cpu") -> None:
        self.units, self.value = units, value
        FixedRule.seen.append({"values_per_unit": values_per_unit, "device": device})

    def update(self, activations: object) -> None:
        pass

    def finish(self) -> np.ndarray:
        return np.full(self.units, self.value, dtype=np.float64)


class FixedPlugin:
    __name__ = "fixed_rules"

    @netdissection.hookimpl
    def dissect_register_thresholds(self, register):  # type: ignore[no-untyped-def]
        register("absolute", FixedRule, description="one absolute threshold for every unit")


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=8, image_size=32, seed=0)


def _summary(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "summary.json").read_text())


def test_threshold_param_and_the_quantile_shortcut_agree(run_cli, concept_set: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = ("resnet18", "--dataset", concept_set, "--layer", "layer1", "--workers", "0", "--report", "thresholds")
    code, _, err = run_cli(*args, "--threshold", "quantile", "--threshold-param", "q=0.02", "--out", tmp_path / "a")
    assert code == 0, err
    code, _, err = run_cli(*args, "--quantile", "0.02", "--out", tmp_path / "b")
    assert code == 0, err
    assert (tmp_path / "a/layer1/thresholds.csv").read_text() == (tmp_path / "b/layer1/thresholds.csv").read_text()
    for out in ("a", "b"):
        rule = _summary(tmp_path / out)["provenance"]["threshold_rule"]
        assert (rule["name"], rule["plugin"]) == ("quantile", "quantile")
        assert (rule["params"]["q"], rule["params"]["compat"]) == (0.02, "paper")
    code, _, err = run_cli(*args, "--compat", "lite", "--out", tmp_path / "c")
    assert code == 0, err
    params = _summary(tmp_path / "c")["provenance"]["threshold_rule"]["params"]
    assert (params["q"], params["compat"]) == (0.005, "lite")


def test_a_plugin_rule_sets_the_thresholds_and_the_tally(run_cli, concept_set: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    FixedRule.seen.clear()
    code, _, err = run_cli("resnet18", "--dataset", concept_set, "--layer", "layer1", "--workers", "0",
                           "--threshold", "absolute", "--threshold-param", "value=0.25", "--report", "tally,thresholds",
                           "--out", tmp_path / "o", plugins=(FixedPlugin(),))
    assert code == 0, err
    rows = (tmp_path / "o/layer1/thresholds.csv").read_text().splitlines()[1:]
    assert len(rows) == 64 and {row.split(",")[1] for row in rows} == {"0.25"}
    rule = _summary(tmp_path / "o")["provenance"]["threshold_rule"]
    assert rule == {"name": "absolute", "plugin": "fixed_rules", "params": {"value": 0.25}}
    # The factory got what its signature names: the values per unit (8 images × 8×8 maps) and the device.
    assert FixedRule.seen[-1] == {"values_per_unit": 8 * 8 * 8, "device": "cpu"}
    assert sorted(p.name for p in (tmp_path / "o/layer1").iterdir()) == ["counts.npz", "tally.csv", "thresholds.csv"]
    # Other thresholds, another tally than the quantile rule's.
    quantile = netdissection.dissect("resnet18", dataset=str(concept_set), layers=["layer1"], workers=0)
    fixed = netdissection.load_results(tmp_path / "o").layers["layer1"]
    assert not np.array_equal(quantile.layers["layer1"].intersection, fixed.intersection)


@pytest.mark.parametrize(("args", "needles"), [
    (("--threshold", "quantil"), ("unknown threshold rule 'quantil'", "'quantile'")),
    (("--threshold", "quantile", "--threshold-param", "r=3"), ("takes no parameter 'r'", "it takes: q")),
    (("--threshold-param", "q=3"), ("'quantile'", "q=3", "between 0 and 1")),
    (("--threshold", "absolute"), ("'absolute'", "needs --threshold-param value=VALUE")),
    (("--threshold", "absolute", "--quantile", "0.1"), ("--quantile", "--threshold-param")),
    (("--threshold-param", "compat=lite"), ("--compat",)),
    (("--threshold-param", "q=0.1", "--quantile", "0.2"), ("disagree",)),
    (("--report", "tally,nosuch"), ("unknown report writer 'nosuch'",)),
    (("--dataset-format", "brodn"), ("unknown dataset format 'brodn'", "'broden'")),
])
def test_wrong_names_and_parameters_fail_before_any_pass(run_cli, concept_set: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    code, _, err = run_cli("resnet18", "--dataset", concept_set, "--out", tmp_path / "o", *args,
                           plugins=(FixedPlugin(),))
    assert_one_line_error(code, err, *needles)
    assert "images/s" not in err  # no pass started
    assert not (tmp_path / "o").exists()


def test_an_unknown_writer_fails_in_a_blink(run_cli, concept_set: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    code, _, err = run_cli("resnet18", "--report", "nosuch", "--dataset", concept_set, "--out", tmp_path / "o")
    seconds = time.perf_counter() - started
    assert_one_line_error(code, err, "unknown report writer 'nosuch'", "html")
    assert seconds < 2, seconds
    # In a fresh process: no framework was even imported, so no model was built and no pass ran.
    code = ("import sys\nfrom netdissection.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "resnet18", "--report", "nosuch", "--dataset", str(concept_set)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
    assert_one_line_error(2, proc.stderr, "nosuch")


def test_python_api_threshold_selection(concept_set: Path) -> None:
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
    host = netdissection.build_host(entry_points=False, extra_plugins=(FixedPlugin(),))
    result = netdissection.dissect(model, dataset=str(concept_set), layers=["1"], workers=0, host=host,
                                   threshold="absolute", threshold_params={"value": 0.5})
    np.testing.assert_array_equal(result.layers["1"].thresholds, np.full(4, 0.5))
    assert result.provenance["threshold_rule"]["name"] == "absolute"
    with pytest.raises(netdissection.DissectionError, match="--quantile sets the quantile rule"):
        netdissection.dissect(model, dataset=str(concept_set), host=host, threshold="absolute",
                              threshold_params={"value": 0.5}, quantile=0.01)
