"""Writing a finished run: the saved counts and the JSON summary first, then the report writers, then the
summary again with every file written.

The counts and the summary come first, so that a report writer that fails (or a run killed while the
reports are drawn) never costs the results: ``dissect report`` rebuilds every report from them. Kept apart
from the scheduler so that rebuilding reports never imports a framework.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .explain import EXPLANATIONS, write_explanations
from .files import atomic_write_text, layer_dirnames
from .results import COUNTS, SUMMARY, save_counts, vocabulary_to_json, write_summary
from .scores import count_detectors, unit_scores
from .skipped import SKIPPED_CSV, skipped_text, skipped_to_json
from .types import DETECTOR_IOU, RunResult

if TYPE_CHECKING:  # pragma: no cover
    from .run import RunEvents, WriterChoice


def random_weights(provenance: Mapping[str, Any]) -> dict[str, int] | None:
    """``{"seed": N}`` when the model ran with the backend's seeded random initialisation (no weights file,
    not pretrained), else None: such a run's detectors are those of an untrained network."""
    seed = (provenance.get("backend_details") or {}).get("random_init_seed")
    return {"seed": int(seed)} if seed is not None else None


def summary_of(result: RunResult) -> dict[str, Any]:
    """The JSON summary: provenance, vocabulary, and per layer the detector counts by both rules."""
    folders = layer_dirnames(result.layers)
    layers = []
    for name, layer in result.layers.items():
        rows = unit_scores(layer)
        counts = count_detectors(rows, layer.vocabulary.categories)
        detector_ious = [r.score for r in rows if r.score >= DETECTOR_IOU]
        layers.append({
            "layer": name,
            "requested": name,
            "module": layer.module or name,
            "map": list(layer.map_shape) if layer.map_shape else None,
            "folder": folders[name],
            "units": layer.units,
            "warnings": list(layer.warnings),
            "detectors": counts.detectors,
            "unique_labels": counts.unique_labels,
            "detectors_by_category": counts.detectors_by_category,
            "unique_labels_by_category": counts.unique_by_category,
            "paper_units_by_category": counts.paper_units_by_category,
            "paper_unique_labels_by_category": counts.paper_unique_by_category,
            "paper_unique_labels_total": counts.paper_unique_total,
            "mean_iou_of_detectors": sum(detector_ious) / len(detector_ious) if detector_ious else None,
            "seconds": layer.seconds,
            **({"bootstrap": layer.bootstrap.to_json()} if layer.bootstrap is not None else {}),
        })
    return {
        "format": "netdissection-run/1",
        "counting_rules": {
            "detectors": "report rule: one label per unit (its best concept), a detector when IoU >= 0.04",
            "paper": "the paper's figures: per category, units whose best IoU within the category is > 0.04, "
                     "and the unique labels among them; a unit can count in several categories",
        },
        "random_weights": random_weights(result.provenance),
        "images": result.images,
        "seconds": result.seconds,
        "provenance": result.provenance,
        "vocabulary": vocabulary_to_json(next(iter(result.layers.values())).vocabulary),
        "layers": layers,
        "written": result.written,
        "plugin_errors": result.plugin_errors,
        "skipped": skipped_to_json(result.skipped),
    }


def rewrite_summary(result: RunResult, out: Path) -> Path:
    """Write ``summary.json`` (atomically) from the result as it stands."""
    return write_summary(out / SUMMARY, summary_of(result))


def write_results(result: RunResult, out: Path, writers: Sequence[WriterChoice] = (),
                  events: RunEvents | None = None) -> list[Path]:
    """Save the counts and the summary, then run each writer on its own, then rewrite the summary with every
    file written and every plugin failure. A writer that raises (or returns paths outside ``out``) is
    handed to ``events.writer_failed``, which may raise (strict plugins); its files are not listed.

    Until the new counts and summary are complete the folder holds no summary.json of another run (an
    earlier run's is removed first), so that it never shows one run's summary over another's files. A disk
    that fills meanwhile ends it with one :class:`~netdissection.core.space.DiskFullError` line, and
    without a summary.json: what was written is no result."""
    from .space import DiskFullError, is_disk_full, run_results_bytes

    if _summary_of_another_run(out / SUMMARY, result):
        (out / SUMMARY).unlink()
    try:
        return _write_all(result, out, writers, events)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        (out / SUMMARY).unlink(missing_ok=True)
        raise DiskFullError(out, "the results", run_results_bytes(result)) from None


def _write_all(result: RunResult, out: Path, writers: Sequence[WriterChoice] = (),
               events: RunEvents | None = None) -> list[Path]:
    from .run import QuietEvents
    from .space import is_disk_full

    events = events if events is not None else QuietEvents()
    started = time.perf_counter()
    folders = layer_dirnames(result.layers)
    written: list[str] = []
    for name, layer in result.layers.items():
        written.append(_relative(save_counts(layer, out / folders[name] / COUNTS), out))
        if layer.explanations is not None:  # a result, like the counts: written whichever writers run
            written.append(_relative(write_explanations(layer.explanations, out / folders[name] / EXPLANATIONS),
                                     out))
    if result.skipped:
        written.append(_relative(atomic_write_text(out / SKIPPED_CSV, skipped_text(result.skipped)), out))
    result.written = [*written, SUMMARY]
    result.plugin_errors = events.failures()
    rewrite_summary(result, out)  # from here on the results are complete: `dissect report` can rebuild
    for choice in writers:
        try:
            paths = [_relative(Path(p), out) for p in choice.writer.write(result, out)]
        except Exception as exc:  # one writer's failure costs its own files, never the run's results
            if is_disk_full(exc):  # ... but a full disk is no writer's failure: the run cannot finish
                raise
            events.writer_failed(choice, exc)
            continue
        written.extend(p for p in paths if p not in written)
    result.written = [*written, SUMMARY]
    result.plugin_errors = events.failures()
    # The summary records how long the reports on disk took (the passes' seconds are the run's own).
    result.seconds["reports"] = time.perf_counter() - started
    rewrite_summary(result, out)
    return [out / p for p in result.written]


def _summary_of_another_run(path: Path, result: RunResult) -> bool:
    """Whether ``path`` is the summary of another run than ``result`` (rebuilding the reports of a run
    keeps its summary.json in place while its files are written again)."""
    import json

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    from .results import _json_default

    return not isinstance(saved, dict) or saved.get("provenance") != json.loads(
        json.dumps(result.provenance, default=_json_default))


def _relative(path: Path, out: Path) -> str:
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"wrote {path}, outside the output folder {out}") from None
