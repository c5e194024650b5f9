"""The comparison table: one row per (model, layer), read from each run's summary.json, by both counting rules.

Every count comes from the run's own summary (written by ``core/reporting.summary_of`` from
``core/scores.count_detectors``), so a row equals what ``dissect MODEL`` reports for that model; a
published NetDissect ``tally.csv`` (``--add-tally``) is counted by the same function.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.types import DETECTOR_IOU

OK, FAILED, TALLY = "ok", "failed", "tally"

#: Columns before the per-category ones, in order.
BASE_COLUMNS = ("status", "model", "backend", "weights", "weights_sha256", "x", "rotate", "rotate_seed", "labels",
                "layer", "module", "map",
                "units", "detectors", "unique", "paper_unique", "mean_iou", "images", "seconds", "cached", "key",
                "run", "error")
#: Per category ``<category>_<field>``: detectors and unique concepts by the report rule, units and unique
#: concepts by the paper rule.
CATEGORY_FIELDS = {
    "detectors": "detectors_by_category",
    "unique": "unique_labels_by_category",
    "paper_units": "paper_units_by_category",
    "paper_unique": "paper_unique_labels_by_category",
}
COUNTING_RULES = {
    "detectors, unique, <category>_detectors, <category>_unique":
        f"report rule: one label per unit (its best concept), a detector when its IoU >= {DETECTOR_IOU}",
    "paper_unique, <category>_paper_units, <category>_paper_unique":
        f"paper rule (the paper's figures): per category, the units whose best IoU within the category is > "
        f"{DETECTOR_IOU}, and the unique concepts among them; a unit can count in several categories",
    "mean_iou": "mean IoU of the detectors (report rule)",
    "rotate, rotate_seed": "the units read in a rotated basis Q^rotate, Q a random rotation drawn from rotate_seed "
                           "(empty: the units as they are)",
}


def rows_from_summary(summary: Mapping[str, Any], *, model: str, x: float | None = None,
                      labels: Mapping[str, str] | None = None, weights: str | None = None, cached: bool = False,
                      key: str | None = None, run: str | None = None,
                      run_dir: Path | None = None) -> list[dict[str, Any]]:
    """The rows of one finished run (one per layer). ``run_dir`` is where its files are (for map sizes of
    runs whose summary does not record them)."""
    provenance = summary.get("provenance") or {}
    details = provenance.get("backend_details") or {}
    rotation = provenance.get("rotation") or {}
    seconds = summary.get("seconds") or {}
    rows = []
    for entry in summary.get("layers", []):
        layer = entry.get("requested") or entry["layer"]
        row: dict[str, Any] = {
            "status": OK,
            "model": model,
            "backend": provenance.get("backend"),
            "weights": _weights(weights, summary, details),
            "weights_sha256": details.get("weights_sha256") or details.get("sha256"),
            "x": _number(x),
            "rotate": _number(rotation.get("alpha")),
            "rotate_seed": rotation.get("seed"),
            "labels": dict(labels or {}),
            "layer": layer,
            "module": entry.get("module") or module_of(entry["layer"], details),
            "map": list(entry["map"]) if entry.get("map") else map_shape(run_dir, entry),
            "units": entry["units"],
            "detectors": entry["detectors"],
            "unique": entry["unique_labels"],
            "paper_unique": entry["paper_unique_labels_total"],
            "mean_iou": entry.get("mean_iou_of_detectors"),
            "images": summary.get("images"),
            "seconds": round(float(seconds.get("passes", 0.0)) + float(seconds.get("reports", 0.0)), 3),
            "cached": cached,
            "key": key,
            "run": run,
            "error": None,
        }
        for suffix, field in CATEGORY_FIELDS.items():
            for category, value in (entry.get(field) or {}).items():
                row[f"{category}_{suffix}"] = value
        rows.append(row)
    return rows


def failed_row(model: str, error: str, *, backend: str | None = None, weights: str | None = None,
               x: float | None = None, labels: Mapping[str, str] | None = None, layers: Sequence[str] = (),
               key: str | None = None, rotate: float | None = None, rotate_seed: int | None = None) -> dict[str, Any]:
    return {"status": FAILED, "model": model, "backend": backend, "weights": weights, "weights_sha256": None,
            "x": _number(x), "rotate": _number(rotate), "rotate_seed": rotate_seed if rotate is not None else None,
            "labels": dict(labels or {}), "layer": ", ".join(layers) or None, "module": None,
            "map": None, "units": None, "detectors": None, "unique": None, "paper_unique": None, "mean_iou": None,
            "images": None, "seconds": None, "cached": False, "key": key, "run": None, "error": error}


def tally_row(name: str, path: str | Path) -> dict[str, Any]:
    """A published NetDissect / NetDissect-Lite ``tally.csv`` as a row, counted by both rules."""
    from ..core.scores import count_detectors
    from ..plugins.reports.writers import read_tally

    categories, units = read_tally(Path(path))
    counts = count_detectors(units, categories)
    ious = [u.score for u in units if u.score >= DETECTOR_IOU]
    row = {**failed_row(name, ""), "status": TALLY, "backend": "tally.csv", "weights": str(path), "error": None,
           "units": counts.units, "detectors": counts.detectors, "unique": counts.unique_labels,
           "paper_unique": counts.paper_unique_total, "mean_iou": sum(ious) / len(ious) if ious else None}
    for category in categories:
        row[f"{category}_detectors"] = counts.detectors_by_category[category]
        row[f"{category}_unique"] = counts.unique_by_category[category]
        row[f"{category}_paper_units"] = counts.paper_units_by_category[category]
        row[f"{category}_paper_unique"] = counts.paper_unique_by_category[category]
    return row


def categories_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The categories of the rows' per-category columns, in order of first appearance."""
    found: dict[str, None] = {}
    suffix = "_" + next(iter(CATEGORY_FIELDS))
    for row in rows:
        for column in row:
            if column.endswith(suffix) and column not in BASE_COLUMNS:
                found.setdefault(column[: -len(suffix)], None)
    return list(found)


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    per_category = [f"{c}_{f}" for c in categories_of(rows) for f in CATEGORY_FIELDS]
    split = BASE_COLUMNS.index("mean_iou")
    return [*BASE_COLUMNS[:split], *per_category, *BASE_COLUMNS[split:]]


def module_of(layer: str, details: Mapping[str, Any]) -> str:
    """The module a layer name stands for: a ``stage:N`` alias resolved through the backend's stages."""
    stages = details.get("stages") or {}
    if layer in stages:
        return str(stages[layer])
    if layer.startswith("stage:-") and stages:
        ordered = [stages[k] for k in sorted(stages, key=lambda k: int(k.split(":", 1)[1]))]
        try:
            return str(ordered[int(layer.split(":", 1)[1])])
        except (ValueError, IndexError):
            pass
    return layer


def map_shape(run_dir: Path | None, entry: Mapping[str, Any]) -> list[int] | None:
    """``[units, h, w]`` of a layer from the header of its saved top-image maps (no array is read)."""
    import numpy as np

    if run_dir is None:
        return None
    path = run_dir / entry.get("folder", "") / "counts.npz"
    try:
        with zipfile.ZipFile(path) as archive, archive.open("top_maps.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = reader(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return [int(entry["units"]), int(shape[-2]), int(shape[-1])]


def _weights(weights: str | None, summary: Mapping[str, Any], details: Mapping[str, Any]) -> str | None:
    seed = (summary.get("random_weights") or {}).get("seed")
    if seed is None and details.get("random_init_seed") is not None:
        seed = details["random_init_seed"]
    if seed is not None:
        return f"random (seed {seed})"
    if weights:
        return str(weights)
    if details.get("pretrained"):
        return f"pretrained ({details.get('pretrained_source') or 'the framework'})"
    return details.get("weights")


def _number(x: float | None) -> float | int | None:
    if x is None:
        return None
    return int(x) if float(x).is_integer() else float(x)
