"""``dissect report RESULTS_DIR``: the reports rebuilt from saved results, with no model; bad input."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from netdissection.plugins.reports.html_report import FILES, PAGE
from netdissection.plugins.reports.strips import GAP

from .report_data import SmallRun

RunCli = Callable[..., tuple[int, str, str]]
PLOTS = ("unique_detectors.svg", "unique_detectors_paper.svg", "detectors_by_category.svg")


@pytest.fixture
def results(small_run: SmallRun, tmp_path: Path) -> Path:
    """A copy of the small run's counts and summary only: every report is gone."""
    out = tmp_path / "results"
    shutil.copytree(small_run.out, out, ignore=shutil.ignore_patterns(FILES, PAGE, "*.svg", "*.png"))
    return out


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_rebuilds_every_default_report(run_cli: RunCli, results: Path, small_run: SmallRun) -> None:
    code, out, err = run_cli("report", results)
    assert code == 0, err
    assert (results / PAGE).is_file()
    for layer in ("layer2", "layer3"):
        for plot in PLOTS:
            assert (results / layer / plot).is_file()
        # The strips are the same bytes as the run's own: same maps, same thresholds, same reopened images.
        for strip in sorted((small_run.out / FILES / layer).glob("*.jpg")):
            assert (results / FILES / layer / strip.name).read_bytes() == strip.read_bytes(), strip.name
    assert (results / "detector_fraction_by_layer.svg").is_file()
    # The terminal summary names both layers, both rules, and the page to open.
    flat = " ".join(out.split())
    assert "layer2" in flat and "layer3" in flat
    assert "report rule" in flat and "paper rule" in flat
    assert str(results / PAGE) in flat
    written = json.loads((results / "summary.json").read_text())["written"]
    assert PAGE in written and FILES in written and "layer2/tally.csv" in written


def test_top_k_and_one_writer(run_cli: RunCli, results: Path) -> None:
    code, _, err = run_cli("report", results, "--report", "html", "--top-k", "3")
    assert code == 0, err
    assert not list(results.rglob("*.svg"))  # only the writer asked for ran
    strip = Image.open(results / FILES / "layer2" / "unit0001.jpg")
    assert strip.size == (3 * 64 + 2 * GAP, 64)
    titles = re.findall(r'title="dataset images \(peak activation\): ([^"]*)"', (results / PAGE).read_text())
    assert len(titles) == 128 + 256
    assert all(t.count("#") == 3 for t in titles)
    written = json.loads((results / "summary.json").read_text())["written"]
    assert PAGE in written and not any(w.endswith(".svg") for w in written)


def test_missing_folder(run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli("report", tmp_path / "nowhere")
    _one_line_error(code, err, "nowhere", "does not exist")


def test_folder_without_a_finished_run(run_cli: RunCli, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "layer4").mkdir()
    code, _, err = run_cli("report", tmp_path / "half")
    _one_line_error(code, err, "half", "summary.json")
    assert not (tmp_path / "half" / PAGE).exists()


def test_a_file_is_not_a_results_folder(run_cli: RunCli, tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{}")
    code, _, err = run_cli("report", tmp_path / "summary.json")
    _one_line_error(code, err, "summary.json", "not a folder")


def test_unknown_writer_suggests_close_names(run_cli: RunCli, results: Path) -> None:
    code, _, err = run_cli("report", results, "--report", "htm")
    _one_line_error(code, err, "htm", "html")


def test_top_k_must_be_positive(run_cli: RunCli, results: Path) -> None:
    code, _, err = run_cli("report", results, "--top-k", "0")
    _one_line_error(code, err, "--top-k", "0")


def test_listed_in_help(run_cli: RunCli) -> None:
    code, out, _ = run_cli("report", "--help")
    assert code == 0
    assert "RESULTS_DIR" in out and "--top-k" in out and "--report" in out
