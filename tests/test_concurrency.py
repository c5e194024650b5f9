"""Concurrency: two runs into one output folder (the second is refused in one line naming the first, never
interleaved; a dead run's lock is taken over), and runs sharing the results store (each job committed once,
atomically; no corrupt entry; every run gets the same result)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from netdissection.core.errors import DissectionError
from netdissection.core.locks import LOCK_NAME, FolderBusy, acquire, folder_lock, holder_of
from netdissection.core.store import RUN, STAGING, ResultsStore, verify_entry
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error
from .faults_kit import Zygote, leftovers, result_files


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=12, image_size=32, seed=2)


# ------------------------------------------------------------------------------------------------ the lock


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "out"):
        holder = holder_of(tmp_path / "out")
        assert holder is not None and holder["pid"] == os.getpid()
        with folder_lock(tmp_path / "out"):  # the same thread again: re-entrant
            pass
        assert (tmp_path / "out" / LOCK_NAME).exists()
        refused: list[BaseException] = []

        def other_thread() -> None:
            try:
                acquire(tmp_path / "out")
            except FolderBusy as exc:
                refused.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert refused and "another thread of this process is writing to" in str(refused[0])
    assert not (tmp_path / "out" / LOCK_NAME).exists() and holder_of(tmp_path / "out") is None


_HOLD = """
import os, sys, time
from netdissection.core.locks import acquire
acquire(__import__("pathlib").Path(sys.argv[1]))
if sys.argv[2] == "fork" and os.fork() == 0:
    time.sleep(60)  # a child the holder started (a data loading worker) outlives it
    os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("children", ["none", "fork"])
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path, children: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """kill -9 of the holder frees the folder at once, even when a process it forked still runs."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), children], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"another dissection is writing to {out} \(pid {holder.pid}, since "):
            acquire(out)
        (out / ".tally.csv.tmp-999999999").write_text("half")  # what the killed run was writing
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with caplog.at_level("INFO", logger="netdissection"), folder_lock(out):
            assert holder_of(out)["pid"] == os.getpid()  # type: ignore[index]
        assert f"taking over the lock of a run that stopped (pid {holder.pid})" in caplog.text
        assert not (out / ".tally.csv.tmp-999999999").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the forked child too


def test_two_dissections_into_one_folder(concept_set: Path, tmp_path: Path) -> None:
    """The real command twice, into one --out: while the first runs, the second is refused in one line that
    names it; the first finishes undisturbed; the second, run again, reads the first's result from the store."""
    out, store = tmp_path / "out", tmp_path / "store"
    command = [sys.executable, "-m", "netdissection.cli", "resnet18", "--layer", "layer1", "--dataset",
               str(concept_set), "--workers", "0", "--report", "tally", "--out", str(out), "--store", str(store)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    # The first holds the folder (from before its model is built) and has written who it is (a moment after
    # taking the lock: stopped in between, the second's message could not name it).
    while not (holder_of(out) or {}).get("pid"):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # it stays in the middle of its run while the second tries
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=240)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert_one_line_error(second.returncode, second.stderr, f"another dissection is writing to {out} "
                          f"(pid {first.pid}, since ", "dissect resnet18 --layer layer1", "pick another --out")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    files = result_files(out)
    again = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "from the results store" in again.stdout
    assert result_files(out) == files and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------ the store


def _commit_race(root: str, keys: list[str], barrier: Any, results: Any) -> None:
    """One of two processes: for each key, stage a run, wait for the other, and commit at the same moment."""
    store = ResultsStore(root)
    for key in keys:
        staging = store.begin(key)
        run = staging / RUN
        (run / "layer").mkdir(parents=True)
        (run / "layer" / "tally.csv").write_text(f"written by {os.getpid()}\n")
        (run / "summary.json").write_text(json.dumps({"layers": [{"layer": "layer"}], "by": os.getpid()}))
        barrier.wait()
        entry = store.commit(key, staging, {"model": key})
        results.put((key, os.getpid(), str(entry.path), entry.summary()["by"]))


def test_two_processes_commit_the_same_jobs_at_once(tmp_path: Path) -> None:
    """Two real processes finish the same twenty jobs at the same moments: each job is committed once, whole,
    and both processes get the one committed entry (the other's copy is dropped)."""
    keys = [f"{i:032x}" for i in range(20)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_commit_race, args=(str(tmp_path / "store"), keys, barrier, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    answers = [results.get(timeout=10) for _ in range(2 * len(keys))]
    store = ResultsStore(tmp_path / "store")
    assert sorted(entry.key for entry in store.listing()) == keys
    for key in keys:
        entry = store.lookup(key)
        assert entry is not None
        verify_entry(entry.path)
        got = [a for a in answers if a[0] == key]
        assert {a[2] for a in got} == {str(entry.path)}  # both were handed the same entry ...
        assert {a[3] for a in got} == {entry.summary()["by"]}  # ... the one whose files it holds
        assert (entry.run_dir / "layer" / "tally.csv").read_text() == f"written by {entry.summary()['by']}\n"
    assert list((tmp_path / "store" / STAGING).iterdir()) == []


@pytest.mark.slow
def test_two_comparisons_share_a_store(concept_set: Path, tmp_path: Path,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two `dissect compare` runs at once over the same checkpoints and one store: both finish, each job
    is in the store once and whole, and both tables hold the same numbers."""
    import torch
    from torchvision.models import resnet18

    checkpoint = tmp_path / "epoch_1.pt"
    torch.manual_seed(1)
    torch.save(resnet18().state_dict(), checkpoint)
    store = tmp_path / "store"

    def command(out: Path) -> list[str]:
        return ["compare", "resnet18", "--checkpoints", f"{checkpoint},random", "--layer", "layer1",
                "--dataset", str(concept_set), "--workers", "0", "--report", "tally", "--store", str(store),
                "--out", str(out)]

    zygote = Zygote(tmp_path_factory.mktemp("zygote"))
    try:
        runs = [zygote.start(command(tmp_path / name)) for name in ("a", "b")]
        for run in runs:
            assert run.wait() == 0, run.output()
    finally:
        zygote.close()
    entries = ResultsStore(store).listing()
    assert len(entries) == 2
    for entry in entries:
        verify_entry(entry.path)
    assert list((store / STAGING).iterdir()) == []
    assert leftovers(store, tmp_path / "a", tmp_path / "b") == []

    def numbers(out: Path) -> list[dict[str, Any]]:
        rows = json.loads((out / "compare.json").read_text())["rows"]
        return [{k: v for k, v in r.items() if k not in ("seconds", "cached")} for r in rows]

    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    runs_a, runs_b = sorted((tmp_path / "a" / "runs").iterdir()), sorted((tmp_path / "b" / "runs").iterdir())
    assert [p.name for p in runs_a] == [p.name for p in runs_b] and len(runs_a) == 2
    for a, b in zip(runs_a, runs_b, strict=True):
        assert result_files(a) == result_files(b)


def test_a_busy_folder_through_the_api(concept_set: Path, tmp_path: Path) -> None:
    """Another thread of the process writing into the folder: dissect() refuses in one line."""
    import netdissection

    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with folder_lock(tmp_path / "out"):
            held.set()
            done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        held.wait(60)
        with pytest.raises(DissectionError, match=f"another thread of this process is writing to {tmp_path / 'out'}"):
            netdissection.dissect("resnet18", dataset=str(concept_set), out=tmp_path / "out", workers=0,
                                  layers=["layer1"], reporters=["tally"])
    finally:
        done.set()
        thread.join()
