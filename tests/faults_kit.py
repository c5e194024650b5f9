"""What the fault tests share: real `dissect` processes started in milliseconds and stopped at chosen moments,
a disk that fills up, and the files of a run compared byte for byte.

Real processes, started fast. A test that kills runs twenty times cannot pay an interpreter start and the
import of torch (~5 s) each time. A *zygote* — one Python process that imported the CLI, torch and the
plotting library once — forks a child per run; the child is a real process running ``dissect``'s own
``main`` with its own process group, real signals, real exit statuses (130, 2, -9), nothing shared back.

Chosen moments. A child reports each step it takes to an events file: every batch of every pass (the
progress bars' advance) and every file put in place (``os.replace``, ``os.rename``: the atomic writes of
the results, the reports, the store). Asked to pause at step k, it stops itself (SIGSTOP) right after it,
so that a signal sent then lands at exactly that moment of the run; or the test sends its signal after a
random delay instead.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netdissection.core.volatile import without_volatile

ZYGOTE = r'''
import json, os, signal, sys, time

sys.argv = ["dissect"]
from netdissection.cli import _leave, console_main, main, RichProgress
import torch, torchvision  # noqa: F401  (imported once, shared by every child)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import netdissection.core.scheduler, netdissection.core.reporting, netdissection.plugins.reports.html_report  # noqa

def child(request):
    os.setpgid(0, 0)  # a process group of its own, like a job started from a shell
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    events = os.open(request["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pause_at = request.get("pause_at")
    count = [0]
    run = os.getpid()

    def step(kind, detail):
        # The run's own steps only: a worker it forks (the reports' drawing processes) inherits these hooks
        # and a copy of the count, and would number steps of its own, or stop itself where nobody lets it go on.
        if os.getpid() != run:
            return
        count[0] += 1
        os.write(events, f"{count[0]} {kind} {detail}\n".encode())
        if count[0] == pause_at:
            os.kill(os.getpid(), signal.SIGSTOP)  # the test signals this very moment, then lets it go on

    advance = RichProgress.advance
    def advanced(self, images):
        advance(self, images)
        step("batch", self._progress.tasks[-1].description if self._progress.tasks else "")
    RichProgress.advance = advanced
    replace, rename = os.replace, os.rename
    def replaced(src, dst, *a, **k):
        replace(src, dst, *a, **k)
        step("replace", dst)
    def renamed(src, dst, *a, **k):
        rename(src, dst, *a, **k)
        step("rename", dst)
    os.replace, os.rename = replaced, renamed
    for key, value in request.get("env", {}).items():
        os.environ[key] = value
    try:
        console_main(request["argv"])  # as the dissect command runs it: it ends the process itself
    except BaseException:
        import traceback
        traceback.print_exc()
        _leave(99)

# One run here first, so that every child starts warm (kernels chosen, fonts found, plugins loaded). Torch
# stays on one thread: a process that started its thread pool cannot fork safely.
torch.set_num_threads(1)
warm_up = json.loads(sys.stdin.readline())
if warm_up:
    protocol = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the run's own output is not the protocol's
    try:
        main(warm_up)
    except SystemExit as exc:
        assert not exc.code, f"the warm-up run failed: {exc.code}"
    sys.stdout.flush()
    os.dup2(protocol, 1)
import threading

def say(message):  # os.write, not print: a child forked meanwhile must not inherit a held stdout lock
    os.write(1, (json.dumps(message) + "\n").encode())

def reap(pid):
    _, status = os.waitpid(pid, 0)
    say({"pid": pid, "status": os.waitstatus_to_exitcode(status)})

say({"ready": True})
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    say({"pid": pid})
    threading.Thread(target=reap, args=(pid,), daemon=True).start()
'''


@dataclass
class Child:
    """A `dissect` run forked by the zygote."""

    zygote: Zygote
    pid: int
    log: Path
    events: Path
    code: int | None = None

    def steps(self) -> list[str]:
        """The steps reported so far (``"N kind detail"``)."""
        try:
            return self.events.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_paused(self, timeout: float = 120) -> None:
        """Wait until the child stopped itself at its pause step (or ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _state(self.pid)
            if state in ("T", "t", None, "Z"):
                return
            if self.zygote.poll_status(self) is not None:
                return
            time.sleep(0.005)
        raise AssertionError(f"the child did not pause: {self.log.read_text()[-2000:]}")

    def signal(self, signum: int, group: bool = True) -> None:
        """Send ``signum`` (to the child's process group, as a terminal sends Ctrl-C) and let a paused child
        go on so that it meets the signal where it stopped."""
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
            if signum != signal.SIGKILL:
                os.killpg(self.pid, signal.SIGCONT)

    def wait(self, timeout: float = 300) -> int:
        if self.code is None:
            self.code = self.zygote.wait_status(self, timeout)
        return self.code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Zygote:
    """One process that imported the CLI and torch, forking a `dissect` child per :meth:`start`."""

    def __init__(self, folder: Path, warm_up: list[str] | None = None) -> None:
        """``warm_up``: the arguments of a run the zygote does itself before it forks any child (use
        ``--no-store`` and an ``--out`` of its own)."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                        env={**os.environ, "COLUMNS": "120"}, preexec_fn=ctrl_c_as_in_a_terminal)
        assert self.process.stdin is not None
        self._pending = b""  # bytes read from the zygote's pipe, not yet a whole line
        self.process.stdin.write(json.dumps([str(a) for a in warm_up or []]) + "\n")
        self.process.stdin.flush()
        assert json.loads(self._line(timeout=300)) == {"ready": True}
        self._runs = 0
        self._statuses: dict[int, int] = {}

    def _line(self, timeout: float) -> str:
        """The zygote's next line. Its pipe is read here, not through a buffered ``readline``: select() tells
        only whether the pipe has bytes, and a second line already in Python's buffer would wait unseen
        (two children's exit statuses arriving together left a test waiting for one that had come)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise AssertionError("the zygote did not answer")
            data = os.read(fd, 65536)
            if not data:
                raise AssertionError(f"the zygote ended ({self.process.poll()})")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def _answered(self) -> bool:
        """Whether a line of the zygote's waits: read already, or in the pipe."""
        assert self.process.stdout is not None
        return b"\n" in self._pending or bool(select.select([self.process.stdout.fileno()], [], [], 0)[0])

    def _next(self, timeout: float) -> dict[str, Any]:
        """The zygote's next message; exit statuses are filed by pid as they come."""
        message = json.loads(self._line(timeout))
        if "status" in message:
            self._statuses[message["pid"]] = message["status"]
        return message

    def start(self, argv: list[str], pause_at: int | None = None, env: dict[str, str] | None = None) -> Child:
        """Fork a child running ``dissect ARGV`` (several may run at once); ``pause_at``: the step it stops at."""
        self._runs += 1
        log, events = self.folder / f"run{self._runs}.log", self.folder / f"run{self._runs}.events"
        events.unlink(missing_ok=True)
        request = {"argv": [str(a) for a in argv], "log": str(log), "events": str(events), "pause_at": pause_at,
                   "env": env or {}}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        while True:
            message = self._next(timeout=60)
            if "status" not in message:
                return Child(self, message["pid"], log, events)

    def poll_status(self, child: Child) -> int | None:
        while child.pid not in self._statuses and self._answered():
            self._next(timeout=5)
        child.code = self._statuses.get(child.pid)
        return child.code

    def wait_status(self, child: Child, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while child.pid not in self._statuses:
            self._next(timeout=max(deadline - time.monotonic(), 0.01))
        child.code = self._statuses[child.pid]
        return child.code

    def run(self, argv: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> Child:
        child = self.start(argv, env=env)
        child.wait(timeout)
        return child

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def ctrl_c_as_in_a_terminal() -> None:
    """For a child process: Ctrl-C's default disposition, as a job in the foreground of a terminal has it.
    A test suite started in the background by a non-interactive shell (``pytest &``) inherits Ctrl-C
    ignored, and Python leaves an ignored Ctrl-C ignored: the runs under test would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _state(pid: int) -> str | None:
    """A process's state letter from /proc (R, S, T stopped, Z...), None when it is gone; "?" without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self").exists() else "?"
    return stat.rsplit(")", 1)[1].split()[0]


# ---------------------------------------------------------------------------------------------- the files


RESULT_FILES = ("tally.csv", "thresholds.csv", "counts.npz")


def result_files(out: Path) -> dict[str, bytes]:
    """The files a user's analysis reads, by path: each layer's tally.csv, thresholds.csv and counts.npz as
    bytes, and summary.json without its time stamps and durations (as canonical JSON bytes)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for name in RESULT_FILES for p in sorted(out.rglob(name))}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    files["summary.json"] = json.dumps(without_volatile(summary), sort_keys=True).encode()
    return files


def assert_part_of(out: Path, result: dict[str, bytes]) -> None:
    """``out`` holds a summary.json: the run's results as far as that summary says they were written (a run
    stopped while it drew its reports has its counts and summary, and lists only those), each equal to
    ``result`` (as :func:`result_files` gives it)."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    expected = json.loads(result["summary.json"])
    for name in ("written",):
        summary.pop(name), expected.pop(name)
    assert without_volatile(summary) == expected
    written = json.loads((out / "summary.json").read_text(encoding="utf-8"))["written"]
    for path in written:
        assert (out / path).exists(), path
    for path, content in result_files(out).items():
        if path != "summary.json":
            assert path in written or not path.endswith(".npz")
            assert content == result[path], path


def leftovers(*folders: Path) -> list[str]:
    """What a stopped run must not leave: activation caches, temporary files of atomic writes and reports."""
    found = []
    for folder in folders:
        if folder.exists():
            found += [str(p) for p in folder.rglob("*")
                      if p.name.startswith(".netdissection-cache-") or ".tmp-" in p.name]
    return found


# ---------------------------------------------------------------------------------------------- a full disk


class DiskQuota:
    """Writes under ``folder`` may take ``limit`` bytes in all; past it, a write raises OSError(ENOSPC) as a
    full disk does (after taking what still fits, as a short write). Covers ``open()`` files (the results,
    the reports, PIL and matplotlib's files), ``os.open`` descriptors written with ``os.write``/``os.pwrite``
    (the activation cache) and ``os.sendfile`` (copies). The bytes used and the writes refused live in shared
    memory, so that the processes a writer forks (the HTML report's strip encoders) fill the same disk and
    their refusals count."""

    def __init__(self, folder: Path, limit: int) -> None:
        import multiprocessing

        self.folder = str(Path(folder).resolve())
        self.limit = limit
        self._used = multiprocessing.Value("q", 0)
        self._refused = multiprocessing.Value("q", 0)
        self._fds: set[int] = set()

    @property
    def used(self) -> int:
        return int(self._used.value)

    @property
    def refused(self) -> int:
        """How many writes the full disk refused (in this process and those it forked)."""
        return int(self._refused.value)

    def covers(self, path: Any) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.folder + os.sep)
        except TypeError:
            return False

    def take(self, size: int) -> int:
        """How much of a write of ``size`` bytes still fits; raises ENOSPC when nothing does."""
        with self._used.get_lock():
            room = self.limit - self._used.value
            taken = max(0, min(size, room))
            self._used.value += taken
        if taken < size:
            with self._refused.get_lock():
                self._refused.value += 1
            if taken == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return taken


class _QuotaFile:
    """A file object whose writes count against a :class:`DiskQuota`."""

    def __init__(self, file: Any, quota: DiskQuota) -> None:
        self._file, self._quota = file, quota

    def write(self, data: Any) -> int:
        size = len(data.encode() if isinstance(data, str) else memoryview(data).cast("B"))
        taken = self._quota.take(size)
        if taken < size:
            if not isinstance(data, str):
                self._file.write(memoryview(data).cast("B")[:taken])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._quota._fds.discard(self._file.fileno())
        self._file.close()

    def __enter__(self) -> _QuotaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@contextlib.contextmanager
def disk_quota(folder: Path, limit: int) -> Iterator[DiskQuota]:
    """Within the block, the disk of ``folder`` holds only ``limit`` more bytes (see :class:`DiskQuota`)."""
    quota = DiskQuota(folder, limit)
    real_open, real_os_open = builtins.open, os.open
    real_write, real_pwrite, real_sendfile, real_close = os.write, os.pwrite, os.sendfile, os.close

    def quota_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if quota.covers(file) and any(m in mode for m in "wax+"):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                quota._fds.add(handle.fileno())  # a copy may write through the descriptor (os.sendfile)
            return _QuotaFile(handle, quota)
        return handle

    def quota_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_os_open(path, flags, *args, **kwargs)
        if quota.covers(path) and flags & (os.O_WRONLY | os.O_RDWR):
            quota._fds.add(fd)
        return fd

    def quota_write(fd: int, data: Any) -> int:
        if fd in quota._fds:
            return real_write(fd, memoryview(data).cast("B")[:quota.take(len(memoryview(data).cast("B")))])
        return real_write(fd, data)

    def quota_pwrite(fd: int, data: Any, offset: int) -> int:
        if fd in quota._fds:
            view = memoryview(data).cast("B")
            return real_pwrite(fd, view[:quota.take(len(view))], offset)
        return real_pwrite(fd, data, offset)

    def quota_sendfile(out_fd: int, in_fd: int, offset: Any, count: int) -> int:
        if out_fd in quota._fds:
            count = quota.take(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    def quota_close(fd: int) -> None:
        quota._fds.discard(fd)
        real_close(fd)

    patches = [(builtins, "open", quota_open), (io, "open", quota_open), (os, "open", quota_os_open),
               (os, "write", quota_write),
               (os, "pwrite", quota_pwrite), (os, "sendfile", quota_sendfile), (os, "close", quota_close)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield quota
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
