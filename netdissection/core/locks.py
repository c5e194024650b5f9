"""One writer per output folder: a lock file that names the run holding it.

Two runs writing into one folder would interleave their files: one run's tally.csv beside the other's
counts.npz, under whichever summary.json came last. So a run takes the folder's lock before it writes
anything there, and a second run into the same folder is refused at once with a line naming the holder
(its process id, host, start time and command) rather than made to wait. A dissection takes minutes to
hours: waiting that long without a word would look like a hang, and two runs into one folder are almost
always a slip (a command pasted twice, one --out for two models). The finished run's results are in the
results store, so running the same command again afterwards costs nothing.

The lock is an advisory ``flock`` on ``<folder>/.netdissection.lock``: the kernel drops it when its
process ends, however it ends (kill -9 included), so the lock of a run that died is simply taken by the
next run — no stale lock to clear by hand. The file's content (who holds it) only serves the message;
it is removed when the run lets go. Forked children (data loading workers) close their copy of the
descriptor at once, so that a worker outliving a killed run does not keep its folder locked.

Within one process the lock is re-entrant for the thread that holds it (``dissect`` locks ``--out`` and
the run inside locks it again); another thread of the same process is refused like another process.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import DissectionError
from .files import process_alive, remove_temporaries_of_stopped_runs

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".netdissection.lock"

F = TypeVar("F", bound=Callable[..., Any])

#: How long to wait for a lock whose recorded holder is gone (a process it started may hold the
#: descriptor for a few seconds more) before refusing.
ORPHAN_WAIT = 10.0


class FolderBusy(DissectionError):
    """Another run is writing into the folder."""


@dataclass
class _Held:
    fd: int
    path: Path
    thread: int
    depth: int = 1
    created: bool = False  # the lock made the folder: letting go removes it again if nothing was written


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its locks)."""
    for held in _held.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], option: str = "--out") -> Iterator[None]:
    """Hold ``folder``'s lock for the block (the folder is created). Raises :class:`FolderBusy`, naming the
    holder and ``option`` (how the user picks another folder), when another run holds it."""
    key = acquire(Path(folder), option)
    try:
        yield
    finally:
        release(key)


def locks_folder(parameter: str, option: str = "--out") -> Callable[[F], F]:
    """Decorate a function that writes into the folder its argument ``parameter`` names (None: no folder)
    so that it holds that folder's lock while it runs."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments.get(parameter)
            if folder is None:
                return function(*args, **kwargs)
            with folder_lock(Path(folder), option):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate


def acquire(folder: Path, option: str = "--out") -> str:
    """Take ``folder``'s lock; returns the key to :func:`release` it with."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    with _guard:
        held = _held.get(key)
        if held is not None:
            if held.thread != threading.get_ident():
                raise FolderBusy(f"another thread of this process is writing to {folder}; pick another {option}")
            held.depth += 1
            return key
    if fcntl is None:  # pragma: no cover
        with _guard:
            _held[key] = _Held(-1, path, threading.get_ident())
        return key
    waited_since: float | None = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileNotFoundError:  # a run that made the folder let go of it empty, and removed it
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if _orphaned(holder):
                # Its process is gone; what holds the lock is a child it left, which ends on its own.
                waited_since = time.monotonic() if waited_since is None else waited_since
                if time.monotonic() - waited_since < ORPHAN_WAIT:
                    time.sleep(0.1)
                    continue
            raise FolderBusy(_busy_message(folder, holder, option)) from None
        except BaseException:
            os.close(fd)
            raise
        # The lock is on the file this descriptor opened: is that still the file at ``path``? (A run letting
        # go removes it; a run that opened it just before then must start again on the new file.)
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    earlier = _read_holder(fd)
    if earlier.get("pid"):
        log.info("%s: taking over the lock of a run that stopped (pid %s)", folder, earlier["pid"])
    _write_holder(fd)
    # The folder is this run's now: what runs killed while writing here left half-written goes.
    for path in remove_temporaries_of_stopped_runs(folder):
        log.info("removed what a stopped run left half-written: %s", path)
    with _guard:
        _held[key] = _Held(fd, path, threading.get_ident(), created=created)
    return key


def release(key: str) -> None:
    """Let go of a lock :func:`acquire` took (the last release of a re-entered lock removes the file)."""
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held.depth -= 1
        if held.depth > 0:
            return
        del _held[key]
    if held.fd < 0:  # pragma: no cover
        return
    try:
        # Removed while still held, so that nobody takes the lock of a file that is about to vanish.
        if os.path.samestat(os.stat(held.path), os.fstat(held.fd)):
            held.path.unlink()
    except OSError:
        pass
    finally:
        os.close(held.fd)
    if held.created:
        # A run refused before it wrote anything leaves no empty folder behind (rmdir removes only an
        # empty one, so nothing a run wrote can go).
        with contextlib.suppress(OSError):
            held.path.parent.rmdir()


def holder_of(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds ``folder``'s lock (pid, host, since, command), or None when nobody does."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():  # pragma: no cover
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- the record


def _host() -> str:
    return socket.gethostname()


def _write_holder(fd: int) -> None:
    program = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    if program in ("cli.py", "__main__.py"):  # python -m netdissection.cli
        program = "dissect"
    record = {"pid": os.getpid(), "host": _host(),
              "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([program, *sys.argv[1:]])[:300]}
    data = (json.dumps(record) + "\n").encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as exc:  # a full disk: the lock holds all the same, the message will say less
        log.debug("cannot record the lock's holder: %s", exc)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _orphaned(holder: dict[str, Any]) -> bool:
    """The lock is held but the process it names, on this host, is gone."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != _host():
        return False
    return not process_alive(pid)


def _busy_message(folder: Path, holder: dict[str, Any], option: str) -> str:
    who = []
    if holder.get("pid"):
        who.append(f"pid {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") != _host() else ""))
    if holder.get("since"):
        who.append(f"since {holder['since']}")
    described = f" ({', '.join(who)}" + (f": {holder['command']}" if holder.get("command") else "") + ")" if who else ""
    if _orphaned(holder):
        described += ", a process it started still holds the lock"
    return (f"another dissection is writing to {folder}{described}; wait for it to finish, or pick another "
            f"{option}")
