"""A full disk: what a run's files need, refused up front when they will not fit, and one line when the disk
fills during the run anyway (another process took the space).

A run writes three things: the activation cache (``core/cache.py``: images × Σ units·h·w × 4 bytes, in
the run's folder, deleted when the passes end), its results (counts.npz, tally.csv, thresholds.csv,
summary.json, the HTML report with its image strips, plots) and, through the results store, a copy of
those under the store's folder. Each place that writes catches the operating system's "no space left"
(ENOSPC, or EDQUOT past a quota) and raises :class:`DiskFullError` instead: the folder, what was being
written, about how much it needs, what is free, and the way out. The run then ends as any stopped run
does: the cache deleted, no summary.json left behind, nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import format_size
from .errors import DissectionError

if TYPE_CHECKING:  # pragma: no cover
    from .types import RunResult

#: The errors that mean the disk (or the user's quota on it) is full.
FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)

#: Bytes a unit's top image takes in the HTML report's strips (a JPEG tile of 112 × 112 at quality 72: about
#: 2 kB for the generated set, up to 4 kB for photographs), and its card in report.html.
STRIP_TILE_BYTES = 4096
CARD_BYTES = 1024
#: Plots of a layer (three figures as SVG and PNG) and the run's own files (summary.json, the page's frame).
PLOTS_BYTES = 400_000
RUN_BYTES = 200_000


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk, or the user's quota on it, is full."""
    return isinstance(exc, OSError) and exc.errno in FULL


def free_bytes(folder: Path) -> int | None:
    """The free space of ``folder``'s file system (of its nearest existing parent); None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class DiskFullError(DissectionError):
    """No space left where the run writes; the message names the folder, the need and the way out."""

    def __init__(self, folder: Path, what: str, needed: int | None = None, hint: str | None = None) -> None:
        self.folder, self.what, self.needed = folder, what, needed
        free = free_bytes(folder)
        need = f": it needs about {format_size(needed)}" if needed else ""
        has = f" and {format_size(free)} is free" if free is not None else ""
        super().__init__(f"no space left in {folder} for {what}{need}{has}; "
                         f"{hint or 'free some space there, or pick another folder'}")


@contextlib.contextmanager
def disk_full_as_error(folder: Path, what: str, needed: int | None = None,
                       hint: str | None = None) -> Iterator[None]:
    """Turn "no space left" inside the block into one :class:`DiskFullError` line naming ``folder``."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(folder, what, needed, hint) from None


def check_room(folder: Path, needed: int, what: str, hint: str | None = None) -> None:
    """Refuse before writing when ``folder`` has less free than ``needed`` bytes."""
    free = free_bytes(folder)
    if free is not None and needed > free:
        raise DiskFullError(folder, what, needed, hint)


def results_bytes(layers: Iterable[tuple[int, int, int]], labels: int, categories: int, top_k: int) -> int:
    """About what a run's results take on disk, for layers of ``(units, h, w)`` maps: the counts (an upper
    bound: counts.npz is compressed), tally.csv and thresholds.csv, the HTML report's cards and strips, the
    plots, and the run's own files."""
    total = RUN_BYTES
    for units, h, w in layers:
        counts = 8 * (units * labels + units * categories + labels + units) + units * top_k * (4 * h * w + 12)
        tables = units * (60 + categories * 90) + units * 30
        report = units * (CARD_BYTES + top_k * STRIP_TILE_BYTES)
        total += counts + tables + report + PLOTS_BYTES
    return total


def run_results_bytes(result: RunResult) -> int:
    """:func:`results_bytes` of a finished run."""
    shapes = []
    top_k, labels, categories = 0, 0, 0
    for layer in result.layers.values():
        labels, categories = layer.vocabulary.size, len(layer.vocabulary.categories)
        h, w = layer.map_shape[1:] if layer.map_shape else (1, 1)
        if layer.top_images is not None:
            top_k = max(top_k, int(layer.top_images.indices.shape[1]))
            h, w = layer.top_images.maps.shape[2:]
        shapes.append((layer.units, int(h), int(w)))
    return results_bytes(shapes, labels, categories, top_k)
