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
            with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_run, range(len(tasks))))
        finally:
            gc.unfreeze()
            _TASKS = ()
