"""The files a dataset's tables name, kept inside the dataset's folder.

A dataset comes from a stranger. Its tables name files by relative path, and a path that is absolute, climbs
out with ``..``, or passes through a symbolic link that points outside the folder would let the dataset make
the tool read any file of the machine (and the HTML report would copy the images it finds there into its
thumbnails). A name that is no regular file — a FIFO, a device — would block the run forever on ``open``.
All of these are refused: the syntax when the table is read, the links and the file type when the file is.
A dataset folder that is itself a link (``~/data/broden -> /mnt/big/broden``) is fine: links are judged
against the folder's real location.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...core.errors import DissectionError

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def relative_problem(value: str) -> str | None:
    """Why ``value`` is no portable path relative to the folder (absolute, a drive, a ``..``), or None."""
    if value.startswith(("/", "\\")) or _DRIVE.match(value):
        return "is absolute; paths in a dataset's tables are relative to its folder"
    if ".." in value and ".." in re.split(r"[/\\]", value):
        return "climbs out of the folder with '..'; paths in a dataset's tables stay inside it"
    if _CONTROL.search(value):
        return "holds a control character"
    return None


def portable(value: str) -> str:
    """A relative path as POSIX (a ``\\`` written on Windows separates folders too)."""
    return value.replace("\\", "/")


class Confined:
    """Opens the files of a dataset folder only when they really lie inside it and are regular files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)

    def file(self, path: Path, what: str) -> Path:
        """``path`` (under the root) when it is a regular file inside the folder; else one line naming ``what``
        (the file, as the caller names it in every message).

        Only the components below the root are looked at, one ``lstat`` each (a file costs two or three system
        calls): a link among them is resolved and must land inside the folder.
        """
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            parts = ()
        if not parts or ".." in parts:
            return self._resolved(path, what)
        current = str(self.root)
        for part in parts:
            current = os.path.join(current, part)
            mode = _mode(os.lstat, current, what)
            if stat.S_ISLNK(mode):
                return self._resolved(path, what)
        return _regular(mode, what, path)

    def _resolved(self, path: Path, what: str) -> Path:
        real = os.path.realpath(path)
        if os.path.commonpath([self.real_root, real]) != self.real_root:
            raise DissectionError(f"{what} leads outside the dataset folder {self.root} (a symbolic link to {real}); "
                                  "a dataset's files must lie inside its folder: copy the file in")
        return regular_file(path, what)


def regular_file(path: Path, what: str) -> Path:
    """``path`` when it is a regular file (opening a FIFO blocks forever; a device never ends)."""
    return _regular(_mode(os.stat, path, what), what, path)


def _mode(stat_of: Callable[[Any], os.stat_result], path: str | Path, what: str) -> int:
    """``stat_of(path).st_mode`` (``os.stat`` or ``os.lstat``); a missing or unreadable file is one line."""
    try:
        return stat_of(path).st_mode
    except FileNotFoundError:
        raise DissectionError(f"{what} is missing") from None
    except OSError as exc:
        raise DissectionError(f"{what} cannot be read: {exc.strerror or exc}") from None


def _regular(mode: int, what: str, path: Path) -> Path:
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise DissectionError(f"{what} is {kind}, not an image file")
    return path
