"""Hostile files end to end, through ``dissect`` itself: exit status 2 and one line naming the file, never a
traceback, never a result that looks complete — including errors raised inside DataLoader worker processes,
and a worker killed outright. A few fuzzed examples run the whole command; the readers' own fuzz tests
(tests/test_hostile_*.py) cover the bulk of the inputs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import netdissection
from netdissection.core.errors import DissectionError
from netdissection.plugins.datasets.broden import BrodenDataset

from .cli_checks import assert_one_line_error
from .hostile import bomb_png, copy_of, fuzz, hostile_image, mutated_table, read_table, within
from .random_broden import write_random_broden
from .test_hostile_models import RunsCode, _marker_code, tiny_graph


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(tiny_graph(), str(path))
    return path


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_broden(tmp_path_factory.mktemp("template") / "broden", images=4, image_size=16, label_size=8)


def no_results(out: Path) -> None:
    assert not list(out.rglob("summary.json")) and not list(out.rglob("tally.csv"))


def dissect(run_cli: Any, model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(model, "--dataset", data, "--out", out, "--report", "tally", "--batch-size", "2", *extra)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_bomb_label_png_is_one_line_from_a_worker_too(run_cli, model: Path, broden: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       workers: str) -> None:
    """40,000 × 40,000 pixels in a few kB: before, a raw DecompressionBombError traceback from the worker."""
    with copy_of(broden) as root:
        (root / "images" / "img002_color.png").write_bytes(bomb_png(40_000, 40_000))
        code, _, err = dissect(run_cli, model, root, tmp_path / "out", "--workers", workers)
        assert_one_line_error(code, err, "img002_color.png", "1.6 gigapixels", "decompression bomb")
        no_results(tmp_path / "out")


def test_skip_bad_skips_a_bomb_and_finishes(run_cli, model: Path, broden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with copy_of(broden) as root:
        (root / "images" / "img001.png").write_bytes(bomb_png(12_000, 12_000))
        code, _, err = dissect(run_cli, model, root, tmp_path / "out", "--workers", "1", "--skip-bad")
        assert code == 0, err
        assert "img001.png declares 12000×12000" in " ".join(err.split()) and "Traceback" not in err
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"] == 3


def test_a_link_out_of_the_dataset_is_one_line(run_cli, model: Path, broden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "secret.png").write_bytes((broden / "images" / "img003.png").read_bytes())
    with copy_of(broden) as root:
        (root / "images" / "img003.png").unlink()
        (root / "images" / "img003.png").symlink_to(tmp_path / "secret.png")
        code, _, err = dissect(run_cli, model, root, tmp_path / "out", "--workers", "1")
        assert_one_line_error(code, err, "img003.png", "leads outside the dataset folder", "secret.png")
        no_results(tmp_path / "out")


def test_an_absolute_path_in_index_csv_is_one_line(run_cli, model: Path, broden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with copy_of(broden) as root:
        index = root / "index.csv"
        index.write_text(index.read_text().replace("img001.png,", "/etc/hostname,", 1))
        code, _, err = dissect(run_cli, model, root, tmp_path / "out")
        assert_one_line_error(code, err, "index.csv line 3", "'/etc/hostname' is absolute")
        no_results(tmp_path / "out")


def test_a_checkpoint_that_would_run_code_is_one_line_and_runs_nothing(run_cli, broden: Path,  # type: ignore[no-untyped-def]
                                                                       tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    import torchvision

    state: dict[str, Any] = dict(torchvision.models.resnet18().state_dict())
    state["fc.bias"] = RunsCode(_marker_code(marker))
    torch.save(state, tmp_path / "evil.pth")
    code, _, err = run_cli("resnet18", "--weights", tmp_path / "evil.pth", "--dataset", broden, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "evil.pth", "(exec)", "weights_only=True")
    assert not marker.exists()
    no_results(tmp_path / "o")


@pytest.mark.parametrize("damage", ["truncated", "vector"])
def test_bad_onnx_files_are_one_line(run_cli, model: Path, broden: Path, tmp_path: Path, damage: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.onnx"
    if damage == "truncated":
        path.write_bytes(model.read_bytes()[:300])
        needles = ("bad.onnx", "is not an ONNX model")
    else:
        onnx.save(tiny_graph(vector=True), str(path))
        needles = ("bad.onnx", "has no layer with a spatial map")
    code, _, err = dissect(run_cli, path, broden, tmp_path / "out")
    assert_one_line_error(code, err, *needles)
    no_results(tmp_path / "out")


# ---------------------------------------------------------------------------------------- worker processes

class Failing(BrodenDataset):
    """A dataset plugin whose ``load`` fails as code does, not as a DissectionError: raises, or kills its
    process (what the kernel does to a worker that runs out of memory)."""

    how = "raise"

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Any:
        if index == 2:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ZeroDivisionError("division by zero\n  in a second line")
        return super().load(index, image=image, labels=labels)


def test_any_exception_in_a_worker_comes_back_as_one_line_naming_the_sample(model: Path, broden: Path,
                                                                             tmp_path: Path) -> None:
    dataset = Failing(broden)
    with pytest.raises(DissectionError) as caught:
        netdissection.dissect(str(model), dataset=dataset, workers=1, batch_size=2, out=tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message
    assert "sample 2 (" in message and "img002.png) could not be loaded: ZeroDivisionError: division by zero" in message
    no_results(tmp_path / "out")


def test_a_killed_worker_is_one_line(model: Path, broden: Path, tmp_path: Path) -> None:
    dataset = Failing(broden)
    dataset.how = "kill"
    with within(120), pytest.raises(DissectionError, match=r"a data loading worker process died .*--workers 0"):
        netdissection.dissect(str(model), dataset=dataset, workers=1, batch_size=2, out=tmp_path / "out")
    no_results(tmp_path / "out")


class SlowToDie(BrodenDataset):
    """Its loader worker dies a second after it starts sample 2: by then the model is in its first batch."""

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Any:
        if index == 2:
            time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(index, image=image, labels=labels)


class OnFirstBatch(torch.nn.Module):
    """A one-convolution model that, in its first batch of two images, first does ``action`` (once)."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.action = action
        self.done = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2 and not self.done:
            self.done = True
            self.action()
        return self.conv(x)


def kill_the_workers() -> None:
    """Kill the loader's workers a second on: they send the batches after the one running meanwhile."""
    time.sleep(1)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]


def test_a_worker_killed_while_the_model_runs_is_one_line(broden: Path, tmp_path: Path) -> None:
    """A worker that dies while the main process is elsewhere (here in the forward pass, not in the loader):
    before, torch's SIGCHLD handler raised its error right there, and it came out as a traceback (or, in the
    middle of an import, as another error)."""
    with within(120), pytest.raises(DissectionError, match=r"a data loading worker process died .*--workers 0"):
        netdissection.dissect(OnFirstBatch(lambda: time.sleep(3)), layers=["conv"], dataset=SlowToDie(broden),
                              workers=1, batch_size=2, out=tmp_path / "out", reporters=["tally"])
    no_results(tmp_path / "out")


@pytest.mark.parametrize("attempt", range(3))
def test_a_worker_killed_with_batches_on_their_way_is_one_line(broden: Path, tmp_path: Path, attempt: int) -> None:
    """The model kills the loader's worker in its first batch, once the worker has sent the next batches:
    depending on how far the worker's death has gone when the next batch is fetched, torch finds it dead or the
    batch's memory cannot be fetched from it (before: a ConnectionResetError traceback)."""
    with within(120), pytest.raises(DissectionError, match=r"a data loading worker process died .*--workers 0"):
        netdissection.dissect(OnFirstBatch(kill_the_workers), layers=["conv"], dataset=BrodenDataset(broden), workers=1,
                              batch_size=2, out=tmp_path / "out", reporters=["tally"])
    no_results(tmp_path / "out")


def test_mixed_image_sizes_in_one_batch_are_one_line(run_cli, model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A folder set whose images differ in size (Broden's index.csv cannot say so: it is checked when read)."""
    from PIL import Image

    from .concept_folders import make_folder

    root = make_folder(tmp_path / "set")
    Image.new("RGB", (9, 8)).save(root / "images" / "1.png")
    code, _, err = dissect(run_cli, model, root, tmp_path / "out", "--workers", "1")
    assert_one_line_error(code, err, "1.png", "8×9", "the images of a run share one size")
    no_results(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- end to end

@st.composite
def hostile_broden_change(draw: st.DrawFn, root: Path) -> tuple[str, bytes]:
    """One file of a Broden folder and what a stranger put in it instead."""
    target = draw(st.sampled_from(["index.csv", "c_object.csv", "images/img000_object.png", "images/img003.png",
                                   "images/img001_part_2.png"]))
    if target.endswith(".csv"):
        return target, draw(mutated_table(read_table(root / target)))
    size = (16, 16) if target == "images/img003.png" else (8, 8)
    return target, draw(hostile_image(size, ids=(0, 4, 5, 7, 8)))


@fuzz(8)
@given(data=st.data())
def test_the_command_dissects_or_says_one_line(run_cli, model: Path, broden: Path, tmp_path_factory,  # type: ignore[no-untyped-def]
                                               data: st.DataObject) -> None:
    out = tmp_path_factory.mktemp("out")
    with copy_of(broden) as root:
        target, content = data.draw(hostile_broden_change(root), label="change")
        (root / target).write_bytes(content)
        workers = data.draw(st.sampled_from(["0", "1"]), label="workers")
        with within(180):
            code, _, err = dissect(run_cli, model, root, out, "--workers", workers)
    if code == 0:
        assert (out / "summary.json").is_file() and list(out.rglob("tally.csv")), err
        assert "Traceback" not in err
    else:
        assert_one_line_error(code, err)
        no_results(out)


def test_errors_through_the_installed_command(model: Path, broden: Path, tmp_path: Path) -> None:
    """The console script in its own process, a worker decoding the bomb: status 2, one line on stderr."""
    with copy_of(broden) as root:
        (root / "images" / "img000_object.png").write_bytes(bomb_png(40_000, 40_000))
        proc = subprocess.run([sys.executable, "-m", "netdissection.cli", str(model), "--dataset", str(root),
                               "--out", str(tmp_path / "out"), "--workers", "1"],
                              capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "img000_object.png", "decompression bomb")
    no_results(tmp_path / "out")


def _open_files_limit(limit: int) -> Any:
    """A ``preexec_fn``: the child process may open at most ``limit`` files (as ``ulimit -n`` says)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return limited


def test_running_out_of_file_descriptors_is_one_line_or_a_complete_run(model: Path, broden: Path,
                                                                       tmp_path: Path) -> None:
    """Under a low ``ulimit -n`` the loader's workers (each batch they hand over travels as a file descriptor)
    or the run itself is refused a descriptor: one line naming the limit and the fix, and no results; before,
    torch's or multiprocessing's tracebacks, from the workers' threads too. A limit the run fits in is a
    complete run. (Without ``--no-store``, a run refused as its workers start may leave its staging folder
    behind, which the next run removes, as it removes what a killed run left.)"""
    outcomes = []
    for limit in (12, 16, 20, 24, 32, 64):
        out = tmp_path / f"out{limit}"
        proc = subprocess.run([sys.executable, "-m", "netdissection.cli", str(model), "--dataset", str(broden),
                               "--out", str(out), "--workers", "2", "--batch-size", "1", "--report", "tally",
                               "--no-store"],
                              capture_output=True, text=True, timeout=300, preexec_fn=_open_files_limit(limit))
        if proc.returncode == 0:
            assert (out / "summary.json").is_file(), proc.stderr
            outcomes.append("ran")
            continue
        assert_one_line_error(proc.returncode, proc.stderr, "ran out of file descriptors",
                              f"this process may have {limit} open files", "ulimit -n 4096")
        no_results(out)
        outcomes.append("refused")
    assert outcomes[0] == "refused" and outcomes[-1] == "ran", outcomes
