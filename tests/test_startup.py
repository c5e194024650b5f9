"""Commands that run no model never import a deep-learning framework (so they answer at once)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .report_data import SmallRun

FRAMEWORKS = ("torch", "torchvision", "timm", "onnxruntime")

# Runs `dissect ARGS` as the console script does, then prints the frameworks it imported on the last line.
CODE = f"""
import runpy, sys
sys.argv = ["dissect", *sys.argv[1:]]
status = 0
try:
    runpy.run_module("netdissection.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    status = exc.code or 0
print(status, sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))
"""


def dissect(*args: object) -> tuple[str, str]:
    """Run ``dissect ARGS`` in a fresh interpreter; (its output, the status and frameworks it imported)."""
    proc = subprocess.run([sys.executable, "-c", CODE, *map(str, args)], capture_output=True, text=True, check=True)
    *output, last = proc.stdout.strip().splitlines()
    return "\n".join(output), last


@pytest.mark.parametrize(("args", "shows"), [(["--help"], "Usage: dissect"), (["plugins"], "html"),
                                             (["backends"], "torchvision")])
def test_listing_commands_import_no_framework(args: list[str], shows: str) -> None:
    output, imported = dissect(*args)
    assert shows in output
    assert imported == "0 []"


def test_rebuilding_reports_imports_no_framework(small_run: SmallRun, tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(small_run.out, results)
    (results / "report.html").unlink()
    _output, imported = dissect("report", results)
    assert imported == "0 []"
    assert (results / "report.html").is_file()  # every default report was written, the HTML page with its strips
    assert len(list((results / "report_files" / "layer3").glob("unit*.jpg"))) == 256
