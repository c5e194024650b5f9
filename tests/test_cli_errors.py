"""Bad input: one line naming the thing and the fix, exit status 2, no traceback, nothing complete-looking."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from .cli_checks import assert_one_line_error


def _no_results(out: Path) -> None:
    assert not list(out.rglob("tally.csv"))
    assert not list(out.rglob("summary.json"))


@pytest.fixture
def data(random_broden) -> Path:  # type: ignore[no-untyped-def]
    return random_broden(images=6, image_size=32, label_size=16)


def test_unknown_model_suggests_close_names(run_cli, data: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet188", "--dataset", data)
    assert_one_line_error(code, err, "resnet188", "resnet18")


def test_unknown_backend(run_cli, data: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--backend", "torchvison", "--dataset", data)
    assert_one_line_error(code, err, "torchvison", "torchvision")


def test_unknown_layer_suggests_close_names(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--layer", "layer5", "--dataset", data, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "layer5", "layer4")
    _no_results(tmp_path / "o")


def test_layer_without_spatial_map(run_cli, data: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--layer", "fc", "--dataset", data)
    assert_one_line_error(code, err, "'fc'", "no spatial map")


def test_missing_dataset_folder(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--dataset", tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere", "does not exist")


def test_unknown_category(run_cli, data: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--dataset", data, "--categories", "object,colour")
    assert_one_line_error(code, err, "colour", "color")


def test_malformed_index_csv(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    index = data / "index.csv"
    rows = list(csv.reader(index.open()))
    rows[0][rows[0].index("sh")] = "label_h"
    with index.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    code, _, err = run_cli("resnet18", "--dataset", data, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "index.csv", "sh")


def test_non_integer_size_in_index_csv(run_cli, data: Path) -> None:  # type: ignore[no-untyped-def]
    index = data / "index.csv"
    text = index.read_text().splitlines()
    fields = text[2].split(",")
    fields[4] = "sixteen"
    text[2] = ",".join(fields)
    index.write_text("\n".join(text) + "\n")
    code, _, err = run_cli("resnet18", "--dataset", data)
    assert_one_line_error(code, err, "index.csv line 3", "sixteen")


def test_corrupt_image(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (data / "images" / "img004.png").write_bytes(b"not a png at all")
    code, _, err = run_cli("resnet18", "--dataset", data, "--out", tmp_path / "o", "--workers", "0")
    assert_one_line_error(code, err, "img004.png", "corrupt", "--skip-bad")
    _no_results(tmp_path / "o")


def test_corrupt_label_png(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (data / "images" / "img003_part_2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run_cli("resnet18", "--dataset", data, "--out", tmp_path / "o", "--workers", "1")
    assert_one_line_error(code, err, "img003_part_2.png", "corrupt")
    _no_results(tmp_path / "o")


def test_label_size_disagrees_with_index(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    Image.new("RGB", (15, 16)).save(data / "images" / "img001_object.png")
    code, _, err = run_cli("resnet18", "--dataset", data, "--out", tmp_path / "o", "--workers", "0")
    assert_one_line_error(code, err, "img001_object.png", "16×15", "16×16")
    _no_results(tmp_path / "o")


def test_skip_bad_skips_and_finishes(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (data / "images" / "img004.png").write_bytes(b"not a png at all")
    code, _out, err = run_cli("resnet18", "--dataset", data, "--out", tmp_path / "o", "--workers", "0",
                             "--skip-bad")
    assert code == 0, err
    assert "img004.png" in err
    assert (tmp_path / "o" / "layer4" / "tally.csv").is_file()
    import json

    assert json.loads((tmp_path / "o" / "summary.json").read_text())["images"] == 5


def test_errors_through_the_console_script(data: Path) -> None:
    """The installed command itself: exit status 2 and a single line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "netdissection.cli", "resnet18", "--layer", "layer9",
                           "--dataset", str(data)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "layer9")


def test_a_run_killed_half_way_leaves_nothing_complete(tmp_path: Path) -> None:
    """SIGKILL in the middle of the passes: no tally.csv, no summary.json; a rerun then completes."""
    import os
    import signal
    import time

    from netdissection.plugins.datasets.generated import generate_concept_set

    data = generate_concept_set(tmp_path / "set", images=400, image_size=64, seed=0)
    out = tmp_path / "out"
    # --no-store: the run writes into --out itself (through the store it writes into the store's staging folder).
    command = [sys.executable, "-m", "netdissection.cli", "resnet18", "--dataset", str(data), "--out", str(out),
               "--layer", "layer3", "--layer", "layer4", "--batch-size", "8", "--workers", "0", "--no-store"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob(".netdissection-cache-*/*")):
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the passes
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _no_results(out)
    assert not list(out.rglob("thresholds.csv"))

    assert list(out.glob(".netdissection-cache-*"))  # the killed run could not clean up after itself

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert (out / "layer3" / "tally.csv").is_file() and (out / "summary.json").is_file()
    assert not list(out.glob(".netdissection-cache-*"))  # ... and the next run removed what it left


def test_device_errors(run_cli, data: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    if not torch.cuda.is_available():
        code, _, err = run_cli("resnet18", "--dataset", data, "--device", "cuda")
        assert_one_line_error(code, err, "--device cuda", "no CUDA device")
    code, _, err = run_cli("resnet18", "--dataset", data, "--device", "tpu")
    assert_one_line_error(code, err, "--device", "'tpu'")


def test_negative_workers(run_cli, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resnet18", "--dataset", data, "--out", tmp_path / "o", "--workers", "-1")
    assert_one_line_error(code, err, "--workers", "-1", "0 or more")
    _no_results(tmp_path / "o")
