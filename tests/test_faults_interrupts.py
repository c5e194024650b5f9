"""Interruptions: Ctrl-C (SIGINT to the run's process group) at random moments ends a run with exit status 130,
its activation cache removed and nothing half-written; kill -9 at twenty random moments across the passes,
the report writing and the store's commit leaves nothing that looks complete, and a rerun then completes
and writes exactly what the uninterrupted run wrote.

Moments are steps of the run (each batch of each pass, each file put in place), drawn at random from the
uninterrupted run's steps (seeded; ``NETDISSECTION_FAULT_SEED`` draws others); the run stops itself at the
step and the signal lands right there (``faults_kit.Zygote``). A few Ctrl-C moments are drawn by time."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from netdissection.core.store import ResultsStore, verify_entry
from netdissection.plugins.datasets.generated import generate_concept_set

from .faults_kit import Child, Zygote, assert_part_of, ctrl_c_as_in_a_terminal, leftovers, result_files

SEED = int(os.environ.get("NETDISSECTION_FAULT_SEED", "13"))
RUN = ("resnet18", "--layer", "layer1", "--layer", "layer2", "--batch-size", "6", "--workers", "0",
       "--report", "tally,thresholds,html")
MODES = {"store": ["--store"], "no store": ["--no-store"]}


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=18, image_size=32, seed=5)


def arguments(concept_set: Path, out: Path, mode: str, store: Path) -> list[str]:
    return [*RUN, "--dataset", str(concept_set), "--out", str(out),
            *(["--store", str(store)] if mode == "store" else ["--no-store"])]


class Baseline:
    """The uninterrupted run in each mode: what it writes, its steps, its wall time."""

    def __init__(self, zygote: Zygote, concept_set: Path, folder: Path) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.steps: dict[str, list[str]] = {}
        self.seconds: dict[str, float] = {}
        for mode in MODES:
            started = time.monotonic()
            child = zygote.run(arguments(concept_set, folder / mode / "out", mode, folder / mode / "store"))
            self.seconds[mode] = time.monotonic() - started
            assert child.code == 0, child.output()
            self.files[mode] = result_files(folder / mode / "out")
            self.steps[mode] = child.steps()
        assert self.files["store"] == self.files["no store"]

    @property
    def result(self) -> dict[str, bytes]:
        return self.files["store"]


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory, concept_set: Path) -> Any:
    folder = tmp_path_factory.mktemp("zygote")
    process = Zygote(folder, warm_up=arguments(concept_set, folder / "warm-up", "no store", folder))
    yield process
    process.close()


@pytest.fixture(scope="module")
def baseline(zygote: Zygote, concept_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    return Baseline(zygote, concept_set, tmp_path_factory.mktemp("baseline"))


def spread(rng: random.Random, steps: int, count: int) -> list[int]:
    """``count`` random steps of ``1..steps``, one in each of ``count`` equal stretches of the run."""
    return [rng.randint(1 + i * steps // count, max(1 + i * steps // count, (i + 1) * steps // count))
            for i in range(count)]


def assert_left_clean(out: Path, store: Path, result: dict[str, bytes]) -> None:
    """What a stopped run may leave: no cache, no temporary file, no store entry that is not whole, and in
    ``out`` either no summary.json or the complete result."""
    assert leftovers(out, store) == []
    if (out / "summary.json").exists():
        assert_part_of(out, result)
    if store.exists():
        entries = ResultsStore(store).listing()
        for entry in entries:
            verify_entry(entry.path)


def step_kind(steps: list[str], step: int) -> str:
    """What the run had just done at ``step``: a batch of a pass, or which file it had put in place."""
    _, kind, detail = steps[step - 1].split(" ", 2)
    return f"{kind} {Path(detail).name if kind != 'batch' else detail}"


@pytest.mark.slow
def test_kill_9_at_twenty_moments_then_a_rerun_equals_the_uninterrupted_run(zygote: Zygote, baseline: Baseline,
                                                                            concept_set: Path,
                                                                            tmp_path: Path) -> None:
    rng = random.Random(SEED)
    trials = [(mode, step) for mode in MODES for step in spread(rng, len(baseline.steps[mode]), 10)]
    hit: set[str] = set()
    for i, (mode, step) in enumerate(trials):
        out, store = tmp_path / f"out{i}", tmp_path / f"store{i}"
        child = zygote.start(arguments(concept_set, out, mode, store), pause_at=step)
        child.wait_paused()
        child.signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, child.output()
        hit.add(step_kind(baseline.steps[mode], step))
        # Whatever it left: no summary.json, or one that says truly what was written.
        if (out / "summary.json").exists():
            assert_part_of(out, baseline.result)
        rerun = zygote.run(arguments(concept_set, out, mode, store))
        assert rerun.code == 0, rerun.output()
        assert result_files(out) == baseline.result, (mode, step_kind(baseline.steps[mode], step))
        assert leftovers(out, store) == [], (mode, step)
        assert not (out / ".netdissection.lock").exists()
        if mode == "store":
            assert list((store / "staging").iterdir()) == []  # the killed run's staging went with the rerun
            assert len(list((store / "jobs").iterdir())) == 1
    # The moments fell in the passes, in the writing of the results and reports, and (via the store) in the
    # commit and the copy into --out.
    kinds = {kind.split()[0] + " " + kind.split()[1].split(".")[-1] for kind in hit}
    assert {"batch activations", "batch IoU"} <= kinds, sorted(hit)
    assert any(kind.startswith("replace ") for kind in hit), sorted(hit)


@pytest.mark.slow
def test_ctrl_c_at_random_moments(zygote: Zygote, baseline: Baseline, concept_set: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    trials: list[tuple[str, int | None, float]] = [("store", step, 0.0) for step in spread(
        rng, len(baseline.steps["store"]), 6)]
    trials += [("no store", None, rng.uniform(0.0, baseline.seconds["no store"])) for _ in range(3)]
    for i, (mode, step, delay) in enumerate(trials):
        out, store = tmp_path / f"out{i}", tmp_path / f"store{i}"
        child: Child = zygote.start(arguments(concept_set, out, mode, store), pause_at=step)
        if step is not None:
            child.wait_paused()
        else:
            time.sleep(delay)
        child.signal(signal.SIGINT)
        code = child.wait(timeout=120)
        output = child.output()
        assert "Traceback" not in output, output
        if code == 0:  # by time, the run may have finished first
            assert step is None and result_files(out) == baseline.result
            continue
        assert code == 130, output
        assert "interrupted" in output
        assert_left_clean(out, store, baseline.result)
        if store.exists():
            assert list((store / "staging").iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_with_data_loading_workers(tmp_path: Path) -> None:
    """The real command, in an interpreter of its own, with two decoding processes: Ctrl-C reaches them all
    (the whole process group, as a terminal sends it) in the middle of the passes."""
    # Enough images that the passes outlast the signal's way to the run on a fast machine (96 could all be
    # read between the cache appearing and the Ctrl-C arriving).
    data = generate_concept_set(tmp_path / "set", images=480, image_size=32, seed=1)
    out, store = tmp_path / "out", tmp_path / "store"
    command = [sys.executable, "-m", "netdissection.cli", "resnet18", "--layer", "layer1", "--batch-size", "4",
               "--workers", "2", "--report", "tally", "--dataset", str(data), "--out", str(out), "--store", str(store)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "COLUMNS": "120"},
                               preexec_fn=ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 240
    try:
        while not list(store.glob("staging/*/run/.netdissection-cache-*")):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err, err
    assert leftovers(out, store) == []
    assert list((store / "staging").iterdir()) == [] and not (store / "jobs").exists()
    assert not (out / "summary.json").exists()
