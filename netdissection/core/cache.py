"""A per-layer activation cache at layer resolution: raw float32 records on disk, one per image.

The IoU pass (and a threshold rule that reads the maps more than once) needs every raw map again.
Keeping them in memory would grow with the dataset; recomputing them costs another forward pass; the
disk cache costs N × Σ units·h·w × 4 bytes (resnet50 layer3+layer4 on all of Broden: about 75 GB).
``choose_cache`` weighs that against a budget and the free space. Records are written and read with
plain positioned I/O, so the process's memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DissectionError

if TYPE_CHECKING:  # the size and mode checks run before any framework is imported
    import torch

log = logging.getLogger(__name__)

CACHE_PREFIX = ".netdissection-cache-"

#: ``--cache``: where the reads after the activation pass get their maps.
CACHE_MODES = ("auto", "disk", "recompute")

#: The disk cache may take at most this share of the free space of its folder.
FREE_SPACE_SHARE = 0.9

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(size: str | int | None, option: str = "--cache-budget") -> int | None:
    """Bytes from ``500M``, ``20G``, ``1.5T``, ``4096`` (K, M, G, T are powers of 1024; a trailing B or
    iB is allowed); None stays None. ``option`` names the option in the error."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size < 0:
            raise DissectionError(f"{option} must not be negative, not {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", str(size).upper())
    if match is None:
        raise DissectionError(f"{option} must be a size like 500M or 20G, not {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit]:
            return f"{size / _UNITS[unit]:.1f} {unit}B"
    return f"{size} B"


def choose_cache(mode: str, needed: int, folder: Path, budget: int | None, reserve: int = 0) -> tuple[bool, str]:
    """Whether the reads after the activation pass use a disk cache of ``needed`` bytes in ``folder``
    (else they recompute the maps), and why, in words. ``reserve``: what the run's results will need in
    the same folder besides; ``--cache disk`` is refused when the two will not fit the free space."""
    if mode not in CACHE_MODES:
        raise DissectionError(f"--cache must be one of {', '.join(CACHE_MODES)}, not {mode!r}")
    if mode == "recompute":
        return False, "--cache recompute"
    free = shutil.disk_usage(folder).free
    beside = f" (and the results about {format_size(reserve)})" if reserve else ""
    if mode == "disk":
        if needed + reserve > free:
            raise DissectionError(f"--cache disk: the activation cache would take {format_size(needed)}{beside}, "
                                  f"but {folder} has {format_size(free)} free; free some space there, or pass "
                                  "--cache recompute (another forward pass instead of the cache)")
        return True, "--cache disk"
    if budget is not None and needed > budget:
        return False, f"the activation cache would take {format_size(needed)}, over the --cache-budget of " \
                      f"{format_size(budget)}"
    if needed + reserve > FREE_SPACE_SHARE * free:
        return False, f"the activation cache would take {format_size(needed)}{beside}, and {folder} has " \
                      f"{format_size(free)} free"
    return True, f"the activation cache takes {format_size(needed)} in {folder}"


def cache_prefix() -> str:
    """The prefix of this process's cache folders: it names the process, so a later run can tell the
    folders of a run that was killed (its process is gone) from those of a run still going."""
    return f"{CACHE_PREFIX}{os.getpid()}-"


def remove_stale_caches(folder: Path | None) -> None:
    """Delete cache folders left in ``folder`` by runs whose process no longer exists."""
    if folder is None or not folder.is_dir():
        return
    for path in folder.glob(f"{CACHE_PREFIX}*"):
        pid = path.name[len(CACHE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing the activation cache of a run that stopped: %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class ActivationCache:
    """Fixed-size records of ``(units, h, w)`` float32, addressed by dataset index."""

    def __init__(self, path: Path, images: int) -> None:
        self.path = path
        self.images = images
        self.record_shape: tuple[int, int, int] | None = None
        self.present = np.zeros(images, dtype=bool)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def record_bytes(self) -> int:
        assert self.record_shape is not None
        return 4 * int(np.prod(self.record_shape))

    def write(self, indices: np.ndarray, activations: torch.Tensor) -> None:
        shape = tuple(activations.shape[1:])
        if self.record_shape is None:
            self.record_shape = shape  # type: ignore[assignment]
        elif shape != self.record_shape:
            raise ValueError(f"activation maps changed shape from {self.record_shape} to {shape}")
        import torch

        data = activations.detach().to("cpu", torch.float32).contiguous().numpy()
        for run_start, run_stop in _runs(indices):
            _write_fully(self._fd, memoryview(data[run_start:run_stop]).cast("B"),
                         int(indices[run_start]) * self.record_bytes)
        self.present[indices] = True

    def read(self, indices: np.ndarray) -> torch.Tensor:
        assert self.record_shape is not None
        out = np.empty((len(indices), *self.record_shape), dtype=np.float32)
        for run_start, run_stop in _runs(indices):
            count = run_stop - run_start
            raw = os.pread(self._fd, count * self.record_bytes, int(indices[run_start]) * self.record_bytes)
            out[run_start:run_stop] = np.frombuffer(raw, dtype=np.float32).reshape(count, *self.record_shape)
        import torch

        return torch.from_numpy(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


def _write_fully(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data``: a disk filling up may take part of a write and refuse the rest."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data, offset = data[written:], offset + written


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Split positions into runs of consecutive dataset indices: one system call per run."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return list(zip(starts.tolist(), stops.tolist(), strict=True))
