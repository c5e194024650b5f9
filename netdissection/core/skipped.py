"""The samples a run skipped (``--skip-bad``): which, and why, in ``skipped.csv`` and ``summary.json``.

With ``--skip-bad`` a sample whose image or labels cannot be read is left out of every pass, so the counts
are those of the dataset without it; the run lists each such sample so that the user knows what the
numbers stand on. ``skipped.csv`` (``index,image,reason``) lies beside ``summary.json``, which counts them
and repeats the list; the HTML report says how many and names them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .types import SkippedSample

SKIPPED_CSV = "skipped.csv"


def skipped_samples(dataset: Any, failures: Iterable[tuple[int, str]]) -> list[SkippedSample]:
    """The skipped samples of ``failures`` (``(dataset position, message)``), each with its image file as the
    dataset names it: relative to the dataset's folder where it lies inside it."""
    root = (dataset.describe() or {}).get("path") if hasattr(dataset, "describe") else None
    samples = []
    for index, reason in sorted(failures):
        samples.append(SkippedSample(int(index), _image_of(dataset, int(index), root), reason))
    return samples


def _image_of(dataset: Any, index: int, root: str | None) -> str:
    try:
        path = Path(dataset.image_path(index))
    except Exception:  # no image_path, or the very row is what fails
        return ""
    if root:
        try:
            return path.relative_to(Path(root)).as_posix()
        except ValueError:
            pass
    return str(path)


def skipped_text(samples: Sequence[SkippedSample]) -> str:
    """``skipped.csv``: ``index,image,reason``, one row per skipped sample, by dataset position."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "image", "reason"])
    for sample in samples:
        writer.writerow([sample.index, sample.image, sample.reason])
    return out.getvalue()


def skipped_to_json(samples: Sequence[SkippedSample]) -> dict[str, Any]:
    """What ``summary.json`` says of the skipped samples: how many, the file listing them, and the list."""
    return {"count": len(samples), "file": SKIPPED_CSV if samples else None,
            "samples": [{"index": s.index, "image": s.image, "reason": s.reason} for s in samples]}


def skipped_from_json(entry: Any) -> list[SkippedSample]:
    """The skipped samples as ``summary.json`` lists them (none in a summary written before it did)."""
    if not isinstance(entry, dict):
        return []
    return [SkippedSample(int(s["index"]), str(s.get("image", "")), str(s.get("reason", "")))
            for s in entry.get("samples") or []]


def skipped_notice(samples: Sequence[SkippedSample], shown: int = 10) -> str:
    """One sentence for reports: how many samples were skipped, the first few by name, where the rest are."""
    names = [s.image or f"sample {s.index}" for s in samples[:shown]]
    more = f" and {len(samples) - shown} more" if len(samples) > shown else ""
    noun = "sample" if len(samples) == 1 else "samples"
    return (f"{len(samples)} {noun} could not be read and {'was' if len(samples) == 1 else 'were'} skipped "
            f"(--skip-bad): {', '.join(names)}{more}. The counts are those of the dataset without "
            f"{'it' if len(samples) == 1 else 'them'}; {SKIPPED_CSV} says why.")
