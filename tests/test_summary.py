"""The terminal summary: both counting rules labelled, the top units, the files written; fits 80–100 columns."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from netdissection.core.scores import count_detectors, unit_scores
from netdissection.summary import group_written, print_summary

from .report_data import SmallRun


def render(small_run: SmallRun, width: int, seconds: float | None = 12.3) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    print_summary(console, small_run.result, small_run.out, seconds)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100])
def test_summary_content_and_width(small_run: SmallRun, width: int) -> None:
    text = render(small_run, width)
    lines = text.splitlines()
    path_line = next(line for line in lines if line.startswith("results:"))
    # Every line fits, except the results line: paths are never broken (they are there to be copied).
    assert all(len(line.rstrip()) <= width for line in lines if line is not path_line), text
    for name, layer in small_run.result.layers.items():
        rows = unit_scores(layer)
        counts = count_detectors(rows, layer.vocabulary.categories)
        assert (f"{name}: {counts.detectors}/{layer.units} units are detectors covering "
                f"{counts.unique_labels} concepts (IoU ≥ 0.04)") in text
        block = text[text.index(f"{name}: "):]
        for c in layer.vocabulary.categories:
            # The category row: report rule detectors and unique, then the paper rule's units and unique.
            numbers = (counts.detectors_by_category[c], counts.unique_by_category[c],
                       counts.paper_units_by_category[c], counts.paper_unique_by_category[c])
            row = next(line for line in block.splitlines() if line.split()[:1] == [c])
            assert [int(v) for v in row.split()[1:5]] == list(numbers), row
        for r in rows[:10]:  # the top units with label, category and IoU
            assert any(line.split()[-4:] == [str(r.unit), r.label, r.category, f"{r.score:.3f}"]
                       for line in block.splitlines()), r
    assert "detectors, unique: report rule: one label per unit, IoU ≥ 0.04" in text
    assert "paper units, paper unique: paper rule: best IoU within the category > 0.04" in text
    assert f"12.3 s for {small_run.result.images} images · activations" in text
    assert f"open {small_run.out / 'report.html'}" in path_line
    flat = " ".join(text.split())
    assert "layer2/ counts.npz tally.csv thresholds.csv" in flat
    assert "unique_detectors.svg unique_detectors_paper.svg" in flat


def test_summary_of_a_loaded_run_has_no_pass_timings(small_run: SmallRun) -> None:
    text = render(small_run, 100, seconds=None)
    assert "activations" not in text


def test_group_written() -> None:
    written = ["layer2/counts.npz", "layer2/tally.csv", "layer2/plot.svg", "layer2/plot.png", "report.html",
               "report_files", "summary.json", Path("a", "b.csv").as_posix()]
    assert group_written(written) == {
        "layer2": ["counts.npz", "tally.csv", "plot.svg|png"],
        "": ["report.html", "report_files", "summary.json"],
        "a": ["b.csv"],
    }


def test_unit_scores_follow_the_counts(small_run: SmallRun) -> None:
    """The tally rows are scored once per layer result (the reports ask a dozen times), and again when a count
    array is replaced: never the rows of other counts."""
    import dataclasses

    import numpy as np

    from netdissection.core.scores import iou_matrix

    layer = next(iter(small_run.result.layers.values()))
    first = unit_scores(layer)
    assert unit_scores(layer) == first
    best = np.argsort(-iou_matrix(layer).max(axis=1), kind="stable")[0]
    assert first[0].unit == best + 1
    # Another result with the counts of one unit zeroed: its rows, not the first one's.
    zeroed = layer.intersection.copy()
    zeroed[best] = 0
    changed = dataclasses.replace(layer, intersection=zeroed)
    assert unit_scores(changed)[0].unit != first[0].unit
    assert unit_scores(layer) == first
    # The same result with a count array replaced is scored again.
    original = layer.intersection
    try:
        layer.intersection = zeroed
        assert unit_scores(layer) == unit_scores(changed)
    finally:
        layer.intersection = original
    assert unit_scores(layer) == first
