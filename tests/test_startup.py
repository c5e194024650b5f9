"""Commands that run no model never import a deep-learning framework (so they answer at once)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .report_data import SmallRun

FRAMEWORKS = ("torch", "torchvision", "timm", "onnxruntime")

# Runs `dissect ARGS` as the console script does; on its way out (the exit handlers run last) it prints the
# frameworks it imported on the last line.
CODE = f"""
import atexit, runpy, sys
sys.argv = ["dissect", *sys.argv[1:]]
atexit.register(lambda: print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))
runpy.run_module("netdissection.cli", run_name="__main__", alter_sys=True)
"""


def dissect(*args: object) -> tuple[str, str]:
    """Run ``dissect ARGS`` in a fresh interpreter; (its output, its exit status and the frameworks it imported)."""
    proc = subprocess.run([sys.executable, "-c", CODE, *map(str, args)], capture_output=True, text=True)
    *output, last = proc.stdout.strip().splitlines()
    return "\n".join(output), f"{proc.returncode} {last}"


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


# Asks whether timm has a model, in a fresh interpreter; prints the answer and whether timm was imported.
TIMM_ASKED = """
import sys
from netdissection.plugins.backends.torchvision_backend import timm_has_model
print(timm_has_model(sys.argv[1]), "timm" in sys.modules)
"""


def test_timm_names_are_asked_without_importing_timm(tmp_path: Path) -> None:
    """A torchvision run by name says whether timm has the model too; after the first time, timm's names come from
    a file of the user's cache, without timm's half-second import."""
    pytest.importorskip("timm")
    from importlib import metadata

    env = {**os.environ, "NETDISSECTION_CACHE": str(tmp_path)}

    def ask(name: str) -> str:
        return subprocess.run([sys.executable, "-c", TIMM_ASKED, name], capture_output=True, text=True, check=True,
                              env=env).stdout.strip()

    assert ask("resnet18") == "True True"  # the first time: timm imported, its names written down
    names = tmp_path / f"timm-models-{metadata.version('timm')}.txt"
    assert "resnet18" in names.read_text().split() and "alexnet" not in names.read_text().split()
    assert ask("resnet18") == "True False"
    assert ask("alexnet") == "False False"
    names.write_text("alexnet\n")  # the file is what is read: timm itself is not asked again
    assert ask("alexnet") == "True False"
