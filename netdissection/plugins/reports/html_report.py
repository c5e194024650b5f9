"""The HTML report: one self-contained page per run, a section per layer, a card per unit.

``report.html`` in the output folder, with each unit's top images as a JPEG strip in
``report_files/<layer>/unit0001.jpg`` (lazy-loaded, so a 512-unit layer stays light and scrollable).
Sorting (unit, IoU, label, category), the category filter and the detector toggle are inline vanilla
JS; nothing is fetched from the network, so the page works offline and from a copied folder.

The strips come from the results alone (each unit's top images, raw maps and threshold were collected
in the activation pass) plus the dataset's images: no model runs again. A run rebuilt from disk has no
dataset object, so the dataset is reopened from the provenance; if that fails the page is written
without strips and says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError
from ...core.files import atomic_write_text, layer_dirnames
from ...core.hookspecs import hookimpl
from ...core.skipped import skipped_notice
from ...core.space import is_disk_full
from ...core.types import RunResult

if TYPE_CHECKING:  # pragma: no cover
    from .strips import Strip

log = logging.getLogger(__name__)

PAGE = "report.html"
FILES = "report_files"


@dataclass(frozen=True)
class DatasetProblem:
    """Why the dataset's images are not at hand (shown on the page and logged)."""

    message: str


def reopen_dataset(result: RunResult) -> Any:
    """The run's dataset: the object when the run is live, else reopened from its provenance.

    Returns a :class:`DatasetProblem` instead when it cannot be reopened or no longer matches the run
    (another number of images would put the wrong pictures under the units).
    """
    if result.dataset is not None:
        return result.dataset
    described = result.provenance.get("dataset") or {}
    fmt, path = described.get("format"), described.get("path")
    if not fmt or not path:
        return DatasetProblem("the results do not say which dataset the run used")
    from ... import open_dataset

    try:
        # "options" holds what else the format needs to reopen the same samples (an HF split and columns).
        options = {k: v for k, v in (described.get("options") or {}).items() if v is not None}
        dataset = open_dataset(path, format=fmt, categories=described.get("categories"), **options)
    except (DissectionError, OSError, ValueError) as exc:
        return DatasetProblem(f"the {fmt} dataset at {path} cannot be reopened ({exc})")
    expected = described.get("images")
    if expected is not None and len(dataset) != int(expected):
        return DatasetProblem(f"the {fmt} dataset at {path} now has {len(dataset)} images, "
                              f"the run saw {expected}")
    return dataset


class HtmlReport:
    """Writes ``report.html`` and ``report_files/``.

    ``top_k``: images per unit (default: every top image the run kept, ``--top-k`` of the run, 10 by
    default); ``tile``: the side of each image's square in the strip, in pixels; ``quality``: JPEG quality.
    """

    def __init__(self, top_k: int | None = None, tile: int = 112, quality: int = 72,
                 workers: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise DissectionError(f"--top-k must be at least 1, not {top_k}")
        self.top_k, self.tile, self.quality, self.workers = top_k, tile, quality, workers

    def write(self, result: RunResult, out_dir: Path) -> list[Path]:
        from .html_page import render_page
        from .strips import ImageSource, StripJob, write_strips

        started = time.perf_counter()
        dataset = reopen_dataset(result)
        notices: list[str] = [skipped_notice(result.skipped)] if result.skipped else []
        if isinstance(dataset, DatasetProblem):
            notices.append(f"No image strips: {dataset.message}.")
            log.warning("HTML report without image strips: %s", dataset.message)
            dataset = None
        folders = layer_dirnames(result.layers)
        staging = out_dir / f".{FILES}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        strips: dict[str, dict[int, Strip]] = {}
        try:
            if dataset is not None:
                jobs: dict[str, StripJob] = {}
                for name, layer in result.layers.items():
                    if layer.top_images is None:
                        notices.append(f"No image strips for {name}: the run kept no top images.")
                        continue
                    kept = layer.top_images.indices.shape[1]
                    if self.top_k is not None and self.top_k > kept:
                        log.warning("%s: the run kept %d top images per unit, fewer than the %d asked for; "
                                    "dissect again with --top-k %d to keep more", name, kept, self.top_k, self.top_k)
                    jobs[name] = StripJob(layer, staging / folders[name])
                outcomes = write_strips(list(jobs.values()), ImageSource(dataset), tile=self.tile,
                                        quality=self.quality, top_k=self.top_k, workers=self.workers)
                for name, outcome in zip(jobs, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        if is_disk_full(outcome):  # not the images' fault: the run cannot finish its report
                            raise outcome
                        # An image gone bad since the run costs the strips, not the run's results.
                        notices.append(f"No image strips for {name}: {outcome}.")
                        log.warning("HTML report without image strips for %s: %s", name, outcome)
                        shutil.rmtree(staging / folders[name], ignore_errors=True)
                    else:
                        strips[name] = outcome
            page = render_page(result, strips, staging, notices, out_dir)
            written = []
            if strips:
                # Swap the whole folder, so strips of an earlier report (another top-k) never linger.
                final = out_dir / FILES
                shutil.rmtree(final, ignore_errors=True)
                os.replace(staging, final)
                written.append(final)
            written.insert(0, atomic_write_text(out_dir / PAGE, page))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.debug("HTML report: strips of %d units in %.1f s", sum(len(s) for s in strips.values()),
                  time.perf_counter() - started)
        return written


@hookimpl
def dissect_register_reporters(register) -> None:  # type: ignore[no-untyped-def]
    register("html", HtmlReport, description="report.html: a card per unit with its label, IoU and top images "
             "(masks drawn), sortable and filterable", default=True)
