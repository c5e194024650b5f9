"""Report writers for the files analysis scripts already read: NetDissect's tally.csv and thresholds.csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ...core.files import atomic_write_text, layer_dirnames
from ...core.hookspecs import hookimpl
from ...core.types import LayerResult, RunResult

TALLY = "tally.csv"
THRESHOLDS = "thresholds.csv"


def tally_header(categories: tuple[str, ...]) -> list[str]:
    header = ["unit", "category", "label", "score"]
    for c in categories:
        header += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    return header


#: The columns a run with ``--bootstrap`` adds at the end of each row (NetDissect's scripts read the others).
BOOTSTRAP_COLUMNS = ["score-lo", "score-hi", "label-stability", "detector-stability"]


def tally_text(result: LayerResult) -> str:
    """NetDissect's tally: one row per unit (1-based) by descending score, floats at full precision; with a
    bootstrap, the 95% interval of the score and the stabilities of the label and detector status last."""
    from ...core.scores import best_per_category, iou_matrix, unit_scores

    iou = iou_matrix(result)
    per_cat = best_per_category(result, iou)
    names = result.vocabulary.names()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    boot = result.bootstrap
    writer.writerow(tally_header(result.vocabulary.categories) + (BOOTSTRAP_COLUMNS if boot is not None else []))
    for row in unit_scores(result):
        line: list[object] = [row.unit, row.category, row.label, repr(row.score)]
        for best in per_cat[row.unit - 1]:
            line += [names[best.label], best.truth, repr(float(best.activation)), best.intersection,
                     repr(best.iou)]
        if boot is not None:
            u = row.unit - 1
            line += [repr(float(v)) for v in (*boot.score_interval[u], boot.label_stability[u],
                                              boot.detector_stability[u])]
        writer.writerow(line)
    return out.getvalue()


def thresholds_text(result: LayerResult) -> str:
    lines = ["unit,threshold"] + [f"{u + 1},{float(t)!r}" for u, t in enumerate(result.thresholds)]
    return "\n".join(lines) + "\n"


class TallyWriter:
    def write(self, result: RunResult, out_dir: Path) -> list[Path]:
        folders = layer_dirnames(result.layers)
        return [atomic_write_text(out_dir / folders[name] / TALLY, tally_text(layer))
                for name, layer in result.layers.items()]


class ThresholdsWriter:
    def write(self, result: RunResult, out_dir: Path) -> list[Path]:
        folders = layer_dirnames(result.layers)
        return [atomic_write_text(out_dir / folders[name] / THRESHOLDS, thresholds_text(layer))
                for name, layer in result.layers.items()]


@hookimpl
def dissect_register_reporters(register) -> None:  # type: ignore[no-untyped-def]
    register("tally", TallyWriter, description="<layer>/tally.csv in NetDissect's columns", default=True)
    register("thresholds", ThresholdsWriter, description="<layer>/thresholds.csv (unit,threshold)",
             default=True)


def read_tally(path: Path) -> tuple[list[str], list]:  # type: ignore[type-arg]
    """Read any NetDissect-format tally.csv: its categories (column order) and its rows as UnitScores."""
    from ...core.scores import UnitScore

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        categories = [h[: -len("-label")] for h in header if h.endswith("-label")]
        rows = [
            UnitScore(unit=int(r["unit"]), label=r["label"], category=r["category"], score=float(r["score"]),
                      per_category={c: (r[f"{c}-label"], float(r[f"{c}-iou"])) for c in categories})
            for r in reader
        ]
    return categories, rows
