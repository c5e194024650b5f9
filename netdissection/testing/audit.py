"""Which files a piece of code writes, renames and removes, seen through Python's audit hooks (PEP 578).

Every ``open`` for writing (``open()``, ``os.open``, and so everything built on them: numpy, Pillow,
matplotlib, tempfile), every rename/replace, removal and new folder in this process is recorded while an
:class:`Audit` is active. Writes made by other processes (a worker pool) are not seen.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_lock = threading.Lock()
_active: list[Audit] = []
_installed = False


def _path(value: Any) -> str | None:
    if isinstance(value, int) or value is None:
        return None  # a file descriptor: already opened, already recorded
    try:
        return os.path.realpath(os.fsdecode(value))
    except (TypeError, ValueError):
        return None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _active:
        return
    audit = _active[-1]
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        target = _path(path)
        if writing and target is not None:
            audit.opened.append(target)
    elif event == "os.rename":  # os.rename and os.replace
        src, dst = _path(args[0]), _path(args[1])
        if src is not None and dst is not None:
            audit.renamed.append((src, dst))
    elif event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.mkdir"):
        target = _path(args[0])
        if target is not None:
            (audit.made if event == "os.mkdir" else audit.removed).append(target)


@dataclass
class Audit:
    """What was written while the audit was active (``with Audit() as audit: ...``); real paths."""

    opened: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)

    def __enter__(self) -> Audit:
        global _installed
        with _lock:
            if not _installed:  # an audit hook cannot be removed: one, inert while no Audit is active
                sys.addaudithook(_hook)
                _installed = True
            _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _active.remove(self)

    def touched(self) -> list[str]:
        """Every path written, renamed to or from, removed or made."""
        return [*self.opened, *(p for pair in self.renamed for p in pair), *self.removed, *self.made]
