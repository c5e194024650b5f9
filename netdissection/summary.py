"""The terminal summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core.scores import count_detectors, unit_scores
from .core.types import DETECTOR_IOU, RunResult


def print_summary(console: Console, result: RunResult, out_dir: Path, seconds: float) -> None:
    """Per layer: units, detectors and unique concepts per category; time per pass; where results are."""
    for name, layer in result.layers.items():
        cats = layer.vocabulary.categories
        counts = count_detectors(unit_scores(layer), cats)
        table = Table(title=f"{name}: {counts.detectors}/{counts.units} units are detectors covering "
                            f"{counts.unique_labels} concepts (IoU ≥ {DETECTOR_IOU})")
        table.add_column("category")
        table.add_column("detectors", justify="right")
        table.add_column("unique concepts", justify="right")
        table.add_column("paper rule: units / unique (IoU > 0.04 in category)", justify="right")
        for c in cats:
            table.add_row(c, str(counts.detectors_by_category[c]), str(counts.unique_by_category[c]),
                          f"{counts.paper_units_by_category[c]} / {counts.paper_unique_by_category[c]}")
        table.add_row("all", str(counts.detectors), str(counts.unique_labels),
                      f"- / {counts.paper_unique_total}", style="bold")
        console.print(table)
    s = result.seconds
    console.print(
        f"{result.images} images; activation pass {s.get('activations', 0):.1f} s "
        f"({result.images / max(s.get('activations', 1e-9), 1e-9):.1f} images/s), thresholds "
        f"{s.get('thresholds', 0):.2f} s, IoU pass {s.get('iou', 0):.1f} s "
        f"({result.images / max(s.get('iou', 1e-9), 1e-9):.1f} images/s); {seconds:.1f} s in all")
    console.print(f"results: {out_dir}/ (summary.json, <layer>/tally.csv, <layer>/thresholds.csv)")
