"""Independent report tasks (a figure, a chunk of image strips) on every core, in forked worker processes.

Drawing plots and encoding thumbnails is Python and NumPy work that threads cannot spread over cores (the
GIL), so it runs in processes. They are forked from the writer's process: a task is any zero-argument
callable (a closure over the run's results and the dataset), inherited by the children as they are, never
pickled; only its index goes to a child and only its return value comes back. Where forking is not the
safe default (anything but Linux), inside a daemonic process (which may not have children), or for one
task or one core, the tasks run here, one after the other.

Stopped (Ctrl-C, or a task's error): the tasks not started never start, those running finish (their files
whole) and the workers end; a worker still running :data:`GRACE` seconds later is killed, so that a stopped
run never waits for a worker that cannot go on.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# The tasks of the pool being run, set just before its workers fork (so they inherit them).
_TASKS: Sequence[Callable[[], Any]] = ()
_ONE_POOL = threading.Lock()  # one pool at a time per process: _TASKS is the pool's

#: How long a stopped pool waits for the tasks its workers are running (a figure, a chunk of strips: a few
#: seconds at most) before it kills the workers still at it.
GRACE = 30.0


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Linux, and not inside a daemonic process (a multiprocessing pool's worker may have no children)."""
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _run(index: int) -> Any:
    return _TASKS[index]()


def _leave_interrupts_to_the_parent() -> None:
    """In a worker: Ctrl-C (sent to the whole process group) is the parent's to handle; the worker finishes
    its task or is stopped with the pool, instead of printing a traceback of its own. The worker was forked
    with Ctrl-C blocked (see :func:`run_tasks`), so none arrives before it is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Within the block Ctrl-C is held back, and raised at its end (as the handler in place would have).

    Blocking SIGINT in this thread is not enough for that: the kernel hands a signal sent to the process to
    any of its threads that does not block it (rich's progress refresh, torch's threads), and Python then
    raises KeyboardInterrupt in the main thread wherever it is. So in the main thread a handler that only
    notes the Ctrl-C stands in meanwhile. SIGINT is blocked as well, so that processes forked in the block
    start with it blocked."""
    held: list[int] = []
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is not None:  # None: not the main thread (where no KeyboardInterrupt is raised), or not Python's
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C pending meanwhile is noted as it is let in
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if held:
                signal.raise_signal(signal.SIGINT)


def _stop(pool: ProcessPoolExecutor, workers: Sequence[Any]) -> None:
    """Stop ``pool`` and its ``workers`` (processes), its work interrupted: the tasks not started never start,
    those running finish, and the workers end; those still running :data:`GRACE` seconds on are killed.
    Ctrl-C waits meanwhile: a second one does not leave workers behind, which the interpreter would wait for."""
    with _ctrl_c_held():
        manager = getattr(pool, "_executor_manager_thread", None)  # CPython's thread that lets the workers go
        pool.shutdown(wait=False, cancel_futures=True)
        running = {worker.sentinel: worker for worker in workers}
        deadline = time.monotonic() + GRACE
        while running and (left := deadline - time.monotonic()) > 0:
            for ended in multiprocessing.connection.wait(list(running), timeout=left):
                del running[ended]
        for worker in running.values():
            worker.kill()
        if isinstance(manager, threading.Thread) and manager.is_alive():
            manager.join(GRACE)
        if manager is None or not manager.is_alive():  # nobody else waits for them (reaps them) now
            for worker in workers:
                worker.join(GRACE)


def run_tasks(tasks: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
    """Each task's result, in task order. Tasks are handed out in order to whichever worker is free, so
    put the longest first. The first exception a task raises is raised here."""
    global _TASKS
    count = min(cores() if workers is None else workers, len(tasks))
    if count <= 1 or not can_fork():
        return [task() for task in tasks]
    if _TASKS:  # a task that runs tasks of its own (never done here): no pool inside a pool
        return [task() for task in tasks]
    with _ONE_POOL:
        _TASKS = tasks
        # Frozen objects are left out of garbage collection: a collection in a child would otherwise walk
        # every object it inherited (torch's and the model's: hundreds of MB), writing into each and so
        # copying every page of them.
        gc.freeze()
        before = set(multiprocessing.active_children())
        try:
            pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_leave_interrupts_to_the_parent)
            try:
                # The first submit forks every worker (the fork start method), then starts the pool's thread,
                # which alone tells the workers to end: a Ctrl-C in between would leave workers that nobody
                # tells to end, and that the interpreter waits for on its way out. So Ctrl-C waits for the
                # submits (and it cannot land in a child before the child ignores it).
                with _ctrl_c_held():
                    futures = [pool.submit(_run, index) for index in range(len(tasks))]
                results = [future.result() for future in futures]
            except BaseException:
                _stop(pool, [child for child in multiprocessing.active_children() if child not in before])
                raise
            pool.shutdown(wait=True)
            return results
        finally:
            gc.unfreeze()
            _TASKS = ()
