"""Independent report tasks (a figure, a chunk of image strips) on every core, in forked worker processes.

Drawing plots and encoding thumbnails is Python and NumPy work that threads cannot spread over cores (the
GIL), so it runs in processes. They are forked from the writer's process: a task is any zero-argument
callable (a closure over the run's results and the dataset), inherited by the children as they are, never
pickled; only its index goes to a child and only its return value comes back. Where forking is not the
safe default (anything but Linux), inside a daemonic process (which may not have children), or for one
task or one core, the tasks run here, one after the other.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# The tasks of the pool being run, set just before its workers fork (so they inherit them).
_TASKS: Sequence[Callable[[], Any]] = ()
_ONE_POOL = threading.Lock()  # one pool at a time per process: _TASKS is the pool's


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
        try:
            pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_leave_interrupts_to_the_parent)
            try:
                # The first submit forks every worker (the fork start method): with Ctrl-C blocked meanwhile,
                # so that it cannot land in a child before the child ignores it. A Ctrl-C sent in between
                # is delivered here when it is unblocked.
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    futures = [pool.submit(_run, index) for index in range(len(tasks))]
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                return [future.result() for future in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # interrupted: the tasks not started never start
        finally:
            gc.unfreeze()
            _TASKS = ()
