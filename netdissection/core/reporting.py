"""Writing a finished run: the report writers, the saved counts, and the JSON summary (written last).

Kept apart from the scheduler so that rebuilding reports (``dissect report``) never imports a framework.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import layer_dirnames
from .results import COUNTS, SUMMARY, save_counts, vocabulary_to_json, write_summary
from .scores import count_detectors, unit_scores
from .types import RunResult


def _reporters(host: Any, names: Sequence[str] | None,
               options: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, Any]]:
    catalog = host.catalog("reporter")
    chosen = list(names) if names else [e.name for e in catalog if e.metadata.get("default", False)]
    return [(n, catalog.get(n).factory(**(options or {}).get(n, {}))) for n in chosen]


def summary_of(result: RunResult) -> dict[str, Any]:
    """The JSON summary: provenance, vocabulary, and per layer the detector counts by both rules."""
    folders = layer_dirnames(result.layers)
    layers = []
    for name, layer in result.layers.items():
        counts = count_detectors(unit_scores(layer), layer.vocabulary.categories)
        layers.append({
            "layer": name,
            "folder": folders[name],
            "units": layer.units,
            "detectors": counts.detectors,
            "unique_labels": counts.unique_labels,
            "detectors_by_category": counts.detectors_by_category,
            "unique_labels_by_category": counts.unique_by_category,
            "paper_units_by_category": counts.paper_units_by_category,
            "paper_unique_labels_by_category": counts.paper_unique_by_category,
            "paper_unique_labels_total": counts.paper_unique_total,
            "seconds": layer.seconds,
        })
    return {
        "format": "netdissection-run/1",
        "counting_rules": {
            "detectors": "report rule: one label per unit (its best concept), a detector when IoU >= 0.04",
            "paper": "the paper's figures: per category, units whose best IoU within the category is > 0.04, "
                     "and the unique labels among them; a unit can count in several categories",
        },
        "images": result.images,
        "seconds": result.seconds,
        "provenance": result.provenance,
        "vocabulary": vocabulary_to_json(next(iter(result.layers.values())).vocabulary),
        "layers": layers,
        "written": result.written,
    }


def write_reports(host: Any, result: RunResult, out: Path, reporters: Sequence[str] | None = None,
                  options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """Run the report writers, then save the counts and the summary — the summary last, as the mark
    of a complete run. ``options`` gives writers their factory's keyword arguments, by writer name
    (e.g. ``{"html": {"top_k": 5}}``)."""
    started = time.perf_counter()
    folders = layer_dirnames(result.layers)
    written: list[Path] = []
    for name, layer in result.layers.items():
        written.append(save_counts(layer, out / folders[name] / COUNTS))
    for _name, writer in _reporters(host, reporters, options):
        written.extend(writer.write(result, out))
    result.written = [str(p.relative_to(out)) for p in written] + [SUMMARY]
    # The summary records how long the reports on disk took (the passes' seconds are the run's own).
    result.seconds["reports"] = time.perf_counter() - started
    write_summary(out / SUMMARY, summary_of(result))
    return [*written, out / SUMMARY]
