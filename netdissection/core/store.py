"""The results store: finished dissections by job key, so that no finished job is ever computed twice.

Layout (``STORE`` is ``<cache folder>/store`` unless ``--store DIR`` or ``$NETDISSECTION_CACHE`` says
otherwise)::

    STORE/
      jobs/<key>/            one finished job, named by its key (core/jobkey.py)
        job.json             the key's material, the job, when and how long, and every file of run/
                             with its size and SHA-256 (checked each time the entry is read)
        run/                 the run's folder exactly as ``dissect --out`` writes it (summary.json, per
                             layer tally.csv, thresholds.csv, counts.npz, plots, report.html)
      staging/<key>.<host>.<pid>.<token>/
                             a job being computed (same inside: run/, then job.json); renamed to
                             jobs/<key> in one step when complete
      digests.json           SHA-256 of weight and model files by (path, size, mtime, inode)

A job killed part way (even by SIGKILL) leaves only its staging folder, which nothing reads as a result
and the next run on this machine (or ``dissect cache gc``) removes. An entry whose files do not match its
record is reported, removed and computed again: never trusted.

Two processes may compute the same job at once (two ``dissect compare`` sharing the store): each in its
own staging folder, and the first to finish renames its folder to the key; the second finds the entry
there when it commits, drops its own copy and uses the first's. An entry is never half there, and never
written by two processes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DissectionError
from .files import atomic_write_text, cache_root
from .jobkey import KEY_LENGTH, DigestMemo, file_sha256
from .space import disk_full_as_error

log = logging.getLogger(__name__)

#: The way out of a full store.
STORE_HINT = "free some space there (dissect cache gc --max-size SIZE), pick another --store, or pass --no-store"

LAYOUT = "netdissection-store/1"
JOBS = "jobs"
STAGING = "staging"
RECORD = "job.json"
RUN = "run"
SUMMARY = "summary.json"


def default_store_dir() -> Path:
    """``<cache folder>/store``; ``$NETDISSECTION_CACHE`` moves the cache folder."""
    return cache_root() / "store"


class CorruptEntry(Exception):
    """A store entry whose files do not match its record."""


@dataclass(frozen=True)
class StoredJob:
    """A finished job in the store."""

    key: str
    path: Path
    record: dict[str, Any] = field(repr=False)

    @property
    def run_dir(self) -> Path:
        return self.path / RUN

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / SUMMARY).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Listed:
    """An entry as ``dissect cache ls`` shows it (read without checking every file)."""

    key: str
    path: Path
    record: dict[str, Any] | None  # None: the record is unreadable
    bytes: int
    used: float  # last time the entry was read or written (seconds since the epoch)


@dataclass
class GcReport:
    staging: list[Path] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    freed: int = 0


class ResultsStore:
    """Finished runs by key. Safe for several processes at once: a job computed twice is committed once
    (the second finisher finds the first's entry and drops its own)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        if self.root.exists() and not self.root.is_dir():
            raise DissectionError(f"store {self.root} is not a folder; pass --store with a folder (or --no-store)")
        self.memo = DigestMemo(self.root / "digests.json")

    def entry_path(self, key: str) -> Path:
        if len(key) != KEY_LENGTH or not all(c in "0123456789abcdef" for c in key):
            raise DissectionError(f"{key!r} is not a store key ({KEY_LENGTH} hex digits); see: dissect cache ls")
        return self.root / JOBS / key

    # ---- reading -------------------------------------------------------------------------------------------

    def lookup(self, key: str) -> StoredJob | None:
        """The finished job under ``key``, checked file by file; None when there is none. A corrupt entry is
        logged as a warning, removed, and reported as missing, so that it is computed again."""
        path = self.entry_path(key)
        if not path.is_dir():
            return None
        try:
            record = verify_entry(path)
        except CorruptEntry as exc:
            log.warning("store entry %s is corrupt (%s): computing it again", key, exc)
            self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the entry's folder time is its last use (for gc --max-size)
        return StoredJob(key, path, record)

    def listing(self) -> list[Listed]:
        jobs = self.root / JOBS
        found = []
        for path in sorted(jobs.iterdir()) if jobs.is_dir() else []:
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                record = json.loads((path / RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = None
            found.append(Listed(path.name, path, record if isinstance(record, dict) else None, _size(path),
                                path.stat().st_mtime))
        return found

    # ---- writing -------------------------------------------------------------------------------------------

    def begin(self, key: str) -> Path:
        """A fresh staging folder for computing ``key``; the run goes into ``<staging>/run``. What runs
        killed on this machine left in staging (their activation caches may be large) is removed first."""
        self.entry_path(key)  # checks the key
        for left in _staging_of_dead_processes(self.root / STAGING):
            log.info("removing what a stopped run left in the store: %s", left)
            shutil.rmtree(left, ignore_errors=True)
        staging = self.root / STAGING / f"{key}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"
        with disk_full_as_error(self.root, "a run in the results store", hint=STORE_HINT):
            staging.mkdir(parents=True)
        return staging

    def commit(self, key: str, staging: Path, material: Mapping[str, Any],
               details: Mapping[str, Any] | None = None) -> StoredJob:
        """Record the finished run in ``staging`` (its summary.json must be there) and move it under ``key``
        in one rename. ``details`` (the job, its timings) are kept in the record for ``dissect cache ls``."""
        run = staging / RUN
        if not (run / SUMMARY).is_file():
            raise ValueError(f"{run} holds no finished run: {SUMMARY} is missing")
        record = {
            "format": LAYOUT,
            "key": key,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "material": dict(material),
            **dict(details or {}),
            "files": {rel: [p.stat().st_size, file_sha256(p)] for rel, p in _files(run)},
        }
        with disk_full_as_error(self.root, "the record of a finished run", hint=STORE_HINT):
            atomic_write_text(staging / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
        target = self.entry_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        existing = self.lookup(key) if target.exists() else None
        if existing is None:
            try:
                os.rename(staging, target)  # atomic: the entry appears complete or not at all
                return StoredJob(key, target, record)
            except OSError:
                existing = self.lookup(key)
                if existing is None:
                    raise
        log.debug("job %s was committed by another process first; keeping that one", key)
        self.discard(staging)
        return existing

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def remove(self, key: str) -> bool:
        path = self.entry_path(key)
        if not path.exists():
            return False
        self._remove(path)
        return True

    def _remove(self, path: Path) -> None:
        # Rename first, so that a removal stopped half way leaves no entry that looks complete.
        trash = self.root / STAGING / f"removed-{path.name}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, trash)
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, *, max_bytes: int | None = None, older_than_days: float | None = None) -> GcReport:
        """Remove what killed jobs left (staging folders of processes that are gone), corrupt entries, entries
        unused for ``older_than_days``, then the least recently used entries until the store fits
        ``max_bytes``."""
        report = GcReport()
        for staging in _staging_of_dead_processes(self.root / STAGING):
            report.freed += _size(staging)
            shutil.rmtree(staging, ignore_errors=True)
            report.staging.append(staging)
        alive = []
        for entry in self.listing():
            try:
                verify_entry(entry.path)
            except CorruptEntry as exc:
                log.warning("store entry %s is corrupt (%s): removed", entry.key, exc)
                report.corrupt.append(entry.key)
                report.freed += entry.bytes
                self._remove(entry.path)
                continue
            alive.append(entry)
        if older_than_days is not None:
            cutoff = time.time() - older_than_days * 86400
            for entry in [e for e in alive if e.used < cutoff]:
                self._evict(entry, report)
                alive.remove(entry)
        if max_bytes is not None:
            total = sum(e.bytes for e in alive)
            for entry in sorted(alive, key=lambda e: e.used):
                if total <= max_bytes:
                    break
                total -= entry.bytes
                self._evict(entry, report)
        return report

    def _evict(self, entry: Listed, report: GcReport) -> None:
        report.evicted.append(entry.key)
        report.freed += entry.bytes
        self._remove(entry.path)


def verify_entry(path: Path) -> dict[str, Any]:
    """The entry's record, after checking that every file of its run is there with its size and SHA-256."""
    try:
        record = json.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"{RECORD} unreadable: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != LAYOUT or record.get("key") != path.name:
        raise CorruptEntry(f"{RECORD} is not a record of this entry")
    files = record.get("files")
    if not isinstance(files, dict) or SUMMARY not in files:
        raise CorruptEntry(f"{RECORD} lists no {SUMMARY}")
    run = path / RUN
    for rel, (size, sha) in files.items():
        file = run / rel
        if not file.is_file():
            raise CorruptEntry(f"{rel} is missing")
        if file.stat().st_size != size or file_sha256(file) != sha:
            raise CorruptEntry(f"{rel} has changed")
    try:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CorruptEntry(f"{SUMMARY} unreadable: {exc}") from None
    if not isinstance(summary, dict) or not summary.get("layers"):
        raise CorruptEntry(f"{SUMMARY} holds no layer")
    return record


def materialise(source: Path, out: Path) -> list[str]:
    """Put the run in ``source`` into ``out``: hard links where the file system allows (no bytes copied),
    copies elsewhere; each file replaced atomically and summary.json last, as a run writes them. Writers
    replace files rather than edit them, so rebuilding reports in ``out`` never touches the store."""
    files = [(rel, p) for rel, p in _files(source) if rel != SUMMARY] + [(SUMMARY, source / SUMMARY)]
    # Until the last file is in place, ``out`` holds no summary.json: never an earlier run's over these files.
    (out / SUMMARY).unlink(missing_ok=True)
    with disk_full_as_error(out, "the results", _size(source)):
        for rel, src in files:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            try:
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copy2(src, tmp)
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
    return [rel for rel, _ in files]


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            yield path.relative_to(root).as_posix(), path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for _, p in _files(path)) if path.is_dir() else 0


def _host_tag() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())[:40] or "host"


def _staging_of_dead_processes(staging: Path) -> list[Path]:
    """Staging folders left by processes of this machine that no longer run."""
    found = []
    here = _host_tag()
    for path in sorted(staging.iterdir()) if staging.is_dir() else []:
        parts = path.name.split(".")
        if len(parts) != 4 or parts[1] != here or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            found.append(path)
        except PermissionError:  # alive, another user's
            pass
    return found
