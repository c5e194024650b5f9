"""What a run records per layer: the name asked for, the module it resolved to and the map size, in
summary.json, the terminal and the HTML report; the layer's folder is the module's; runs written before these
records keep loading and rebuilding."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import netdissection
from netdissection.plugins.datasets.generated import generate_concept_set

RunCli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """convnext_atto (timm, seeded weights, 64 px) dissected at stage:-1 and at a module path."""
    from netdissection.cli import main

    root = tmp_path_factory.mktemp("records")
    data = generate_concept_set(root / "set", images=6, image_size=64, seed=0)
    try:
        main(["convnext_atto", "--backend", "timm", "--input-size", "64", "--layer", "stage:-1", "--layer",
              "stages.1", "--dataset", str(data), "--out", str(root / "out"), "--workers", "0"])
    except SystemExit as exc:
        assert not exc.code
    return root / "out"


def test_summary_records_requested_module_and_map(run: Path) -> None:
    layers = json.loads((run / "summary.json").read_text())["layers"]
    records = [{k: e[k] for k in ("requested", "module", "map", "folder", "warnings")} for e in layers]
    assert records == [
        {"requested": "stage:-1", "module": "stages.3", "map": [320, 2, 2], "folder": "stages.3", "warnings": []},
        {"requested": "stages.1", "module": "stages.1", "map": [80, 8, 8], "folder": "stages.1", "warnings": []},
    ]
    assert (run / "stages.3" / "tally.csv").is_file() and not (run / "stage_-1").exists()
    page = (run / "report.html").read_text()
    assert '<span class="module">module stages.3, maps of 320 × 2 × 2 (units × h × w)</span>' in page


def test_results_reload_with_their_records(run: Path, run_cli: RunCli) -> None:
    again = netdissection.load_results(run)
    layer = again.layers["stage:-1"]
    assert (layer.module, layer.map_shape) == ("stages.3", (320, 2, 2))
    code, out, err = run_cli("report", run)
    assert code == 0, err
    assert "module stages.3, maps of 320 × 2 × 2" in " ".join(out.split())  # the terminal summary
    assert json.loads((run / "summary.json").read_text())["layers"][0]["folder"] == "stages.3"


def test_a_run_written_before_the_records_still_loads(run: Path, tmp_path: Path, run_cli: RunCli) -> None:
    """Before: no requested/module/map/warnings, and the folder named after the name asked for."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    shutil.move(old / "stages.3", old / "stage_-1")
    summary = json.loads((old / "summary.json").read_text())
    for entry in summary["layers"]:
        for key in ("requested", "module", "map", "warnings"):
            del entry[key]
    summary["layers"][0]["folder"] = "stage_-1"
    (old / "summary.json").write_text(json.dumps(summary))
    layer = netdissection.load_results(old).layers["stage:-1"]
    assert (layer.module, layer.map_shape, layer.warnings) == (None, None, [])
    (old / "stage_-1" / "tally.csv").unlink()
    code, _, err = run_cli("report", old)
    assert code == 0, err
    assert (old / "stage_-1" / "tally.csv").is_file() and not (old / "stages.3").exists()
