"""Ctrl-C and the reports' process pool (:mod:`netdissection.plugins.reports.parallel`), each case in an
interpreter of its own (a small one: no torch), which must end promptly: a worker left behind that nobody
tells to end makes the interpreter wait for it on its way out, forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netdissection.plugins.reports.parallel import can_fork

from .faults_kit import ctrl_c_as_in_a_terminal

pytestmark = pytest.mark.skipif(not can_fork(), reason="the pool forks its workers (Linux)")


def run_script(script: str, timeout: float = 60) -> tuple[str, float]:
    """Run ``script`` in a Python of its own; its stdout, and how long it took to end."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its workers too
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout} s: {out}{err}") from None
    assert process.returncode == 0, out + err
    return out, time.monotonic() - started


def test_ctrl_c_while_the_pool_forks_its_workers() -> None:
    """The Ctrl-C lands while the pool forks its workers, taken by another thread of the process (as rich's
    progress refresh or torch's threads take it, though the forking thread blocks it): it is raised once the
    pool has started, and the workers end with it."""
    out, seconds = run_script("""
        import multiprocessing, os, signal, threading, time
        import concurrent.futures.process as cfp
        from netdissection.plugins.reports.parallel import run_tasks

        threading.Thread(target=threading.Event().wait, daemon=True).start()  # takes signals: blocks none
        spawn = cfp.ProcessPoolExecutor._spawn_process
        def spawn_then_ctrl_c(self):
            spawn(self)
            if len(self._processes) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # to the process: the other thread gets it
                time.sleep(0.5)
        cfp.ProcessPoolExecutor._spawn_process = spawn_then_ctrl_c
        try:
            run_tasks([lambda: 1] * 4, workers=2)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", multiprocessing.active_children())
    """)
    assert out.split("\n")[0] == "interrupted []", out
    assert seconds < 30


def test_ctrl_c_lets_the_running_tasks_finish_and_starts_no_other(tmp_path: Path) -> None:
    out, seconds = run_script(f"""
        import multiprocessing, os, signal, threading, time
        from pathlib import Path
        from netdissection.plugins.reports.parallel import run_tasks

        def task(i):
            time.sleep(1.0)
            (Path({str(tmp_path)!r}) / str(i)).write_text("done")
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            run_tasks([lambda i=i: task(i) for i in range(12)], workers=2)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", multiprocessing.active_children())
    """)
    assert out.split("\n")[0] == "interrupted []", out
    done = sorted(int(p.name) for p in tmp_path.iterdir())
    assert done[:2] == [0, 1] and len(done) < 6, done  # those running, perhaps the one queued; not the rest
    assert seconds < 30


def test_a_worker_that_cannot_go_on_is_killed_after_a_ctrl_c() -> None:
    """A worker stuck in its task (blocked on a lock it inherited held, say) does not hold up a stopped run
    longer than the grace period."""
    out, seconds = run_script("""
        import multiprocessing, os, signal, threading, time
        from netdissection.plugins.reports import parallel

        parallel.GRACE = 1.0
        stuck = threading.Lock()
        stuck.acquire()  # held here: in a worker, forever
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            parallel.run_tasks([stuck.acquire, lambda: 1], workers=2)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", multiprocessing.active_children())
    """)
    assert out.split("\n")[0] == "interrupted []", out
    assert seconds < 30
