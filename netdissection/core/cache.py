"""A per-layer activation cache at layer resolution: raw float32 records on disk, one per image.

The IoU pass (and a threshold rule that reads the maps more than once) needs every raw map again.
Keeping them in memory would grow with the dataset; recomputing them costs another forward pass; the
disk cache costs at most N × Σ units·h·w × 4 bytes (resnet50 layer3+layer4 on all of Broden: about 75 GB),
and about half of it where maps that cannot fire are left out (``ActivationCache``). ``choose_cache`` weighs
the most it can take against a budget and the free space. Records are written and read with plain
positioned I/O, so the process's memory stays flat whatever the dataset size.
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
    """Each image's ``(units, h, w)`` float32 maps, addressed by position in the shard, appended as they come.

    A record holds a bitmask of the units kept and those units' maps: a map whose peak is below its unit's
    ``lower_bound`` (a value the threshold will not be below, see ``BoundedThresholdRule``) can hold no mask
    pixel, so it is not written, and ``read`` gives it back as -inf, below every threshold. On Broden-like
    data that leaves out about half the maps of resnet18's ``layer3`` and ``layer4``. Records of consecutive
    positions lie one after the other, so a batch is written, and read back, with one system call.
    """

    def __init__(self, path: Path, images: int) -> None:
        self.path = path
        self.images = images
        self.record_shape: tuple[int, int, int] | None = None
        self.present = np.zeros(images, dtype=bool)
        self._offset = np.zeros(images, dtype=np.int64)  # where each position's record starts
        self._kept = np.zeros(images, dtype=np.int32)  # how many units' maps it holds
        self._end = 0
        self.maps_written = self.maps_seen = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._end

    @staticmethod
    def most_record_bytes(units: int, h: int, w: int) -> int:
        """The largest record of an image: its bitmask and every unit's map."""
        return _mask_bytes(units) + 4 * units * h * w

    @property
    def _mask_bytes(self) -> int:
        assert self.record_shape is not None
        return _mask_bytes(self.record_shape[0])

    @property
    def _map_bytes(self) -> int:
        assert self.record_shape is not None
        return 4 * self.record_shape[1] * self.record_shape[2]

    def write(self, indices: np.ndarray, activations: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """The maps ``(N, units, h, w)`` of the images at shard positions ``indices``; ``keep`` ``(N, units)``
        says which to write (default: all)."""
        shape = tuple(activations.shape[1:])
        if self.record_shape is None:
            self.record_shape = shape  # type: ignore[assignment]
        elif shape != self.record_shape:
            raise ValueError(f"activation maps changed shape from {self.record_shape} to {shape}")
        import torch

        data = activations.detach().to("cpu", torch.float32).contiguous().numpy()
        n, units = data.shape[:2]
        kept = np.ones((n, units), dtype=bool) if keep is None else keep.detach().cpu().numpy().astype(bool)
        counts = kept.sum(axis=1)
        mask_bytes = self._mask_bytes
        masks = np.zeros((n, mask_bytes), dtype=np.uint8)
        masks[:, :-(-units // 8)] = np.packbits(kept, axis=1, bitorder="little")
        sizes = mask_bytes + counts * self._map_bytes
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        record = np.empty(int(sizes.sum()), dtype=np.uint8)
        for i in range(n):
            at = int(starts[i])
            record[at:at + mask_bytes] = masks[i]
            maps = data[i] if counts[i] == units else data[i][kept[i]]
            record[at + mask_bytes:at + int(sizes[i])] = maps.reshape(-1).view(np.uint8)
        _write_fully(self._fd, memoryview(record), self._end)
        self._offset[indices] = self._end + starts
        self._kept[indices] = counts
        self._end += len(record)
        self.maps_written += int(counts.sum())
        self.maps_seen += n * units
        self.present[indices] = True

    def read(self, indices: np.ndarray) -> torch.Tensor:
        assert self.record_shape is not None
        units, h, w = self.record_shape
        out = np.empty((len(indices), *self.record_shape), dtype=np.float32)
        mask_bytes, map_bytes = self._mask_bytes, self._map_bytes
        sizes = mask_bytes + self._kept[indices].astype(np.int64) * map_bytes
        offsets = self._offset[indices]
        for run_start, run_stop in _runs(indices, offsets, sizes):
            first = int(offsets[run_start])
            raw = os.pread(self._fd, int(offsets[run_stop - 1] + sizes[run_stop - 1]) - first, first)
            for i in range(run_start, run_stop):
                at = int(offsets[i]) - first
                count = int(self._kept[indices[i]])
                maps = np.frombuffer(raw, dtype=np.float32, count=count * h * w, offset=at + mask_bytes)
                if count == units:
                    out[i] = maps.reshape(units, h, w)
                    continue
                kept = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, count=mask_bytes, offset=at),
                                     count=units, bitorder="little").astype(bool)
                out[i].fill(-np.inf)
                out[i][kept] = maps.reshape(count, h, w)
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


def _mask_bytes(units: int) -> int:
    """A record's bitmask of the units kept, padded so that the maps after it stay 4-byte aligned."""
    return -(-units // 32) * 4


def _runs(indices: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> list[tuple[int, int]]:
    """Split positions into runs whose records lie one after the other in the file: one read per run."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(offsets[1:] != offsets[:-1] + sizes[:-1]) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return list(zip(starts.tolist(), stops.tolist(), strict=True))
