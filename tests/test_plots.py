"""The plots: the numbers they show equal the counts of tally.csv by both rules; the files are there."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from netdissection.core.errors import DissectionError
from netdissection.core.scores import UnitScore, count_detectors, unit_scores
from netdissection.core.types import DETECTOR_IOU, RunResult
from netdissection.plugins.reports.plots import (
    RULES,
    PlotsWriter,
    detector_bars,
    draw_bars,
    layer_fractions,
    plot_data,
    save,
)
from netdissection.plugins.reports.writers import read_tally

from .report_data import SmallRun
from .test_golden import GOLDEN, TABLE

LAYER_PLOTS = ("unique_detectors", "unique_detectors_paper", "detectors_by_category")


def bars_by_hand(rows: list[UnitScore], categories: list[str], rule: str) -> Counter[tuple[str, str]]:
    """Units per (category, concept), counted straight from tally rows."""
    units: Counter[tuple[str, str]] = Counter()
    for row in rows:
        if rule == "report" and row.score >= DETECTOR_IOU:
            units[(row.category, row.label)] += 1
        if rule == "paper":
            for c in categories:
                label, iou = row.per_category[c]
                if iou > DETECTOR_IOU:
                    units[(c, label)] += 1
    return units


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_bar_counts_equal_the_tally(small_run: SmallRun, layer: str) -> None:
    """What the plots draw (from the run's counts) against tally.csv on disk, by both rules."""
    categories, rows = read_tally(small_run.out / layer / "tally.csv")
    counts = count_detectors(rows, categories)
    data = plot_data(layer, unit_scores(small_run.result.layers[layer]), categories)
    assert data.counts == counts
    for rule in RULES:
        graph = data.graphs[rule]
        assert Counter({(b.category, b.label): b.units for b in graph.bars}) == bars_by_hand(rows, categories, rule)
        assert len({(b.category, b.label) for b in graph.bars}) == len(graph.bars)
    report, paper = data.graphs["report"], data.graphs["paper"]
    assert report.units_by_category() == {c: n for c, n in counts.detectors_by_category.items() if n}
    assert report.concepts_by_category() == {c: n for c, n in counts.unique_by_category.items() if n}
    assert sum(b.units for b in report.bars) == counts.detectors
    assert len({b.label for b in report.bars}) == counts.unique_labels
    assert paper.units_by_category() == {c: n for c, n in counts.paper_units_by_category.items() if n}
    assert paper.concepts_by_category() == {c: n for c, n in counts.paper_unique_by_category.items() if n}
    assert len(paper.bars) == counts.paper_unique_total
    assert counts.detectors > 0 and counts.paper_unique_total > 0  # not vacuous


def test_bars_are_grouped_by_category_and_sorted(small_run: SmallRun) -> None:
    categories, rows = read_tally(small_run.out / "layer3" / "tally.csv")
    for rule in RULES:
        bars = detector_bars(rows, categories, rule).bars
        keys = [(categories.index(b.category), -b.units, b.label) for b in bars]
        assert keys == sorted(keys)


@pytest.mark.parametrize("name", ["caffe_reference_places365.csv", "ResNet-152-model_imagenet.csv"])
def test_the_paper_figures_from_the_published_tallies(name: str) -> None:
    """The bars of the paper's rule, from the released tallies, add up to the paper's per-category table."""
    categories, rows = read_tally(GOLDEN / name)
    data = plot_data(name, rows, categories)
    _units, detectors, unique, per_category = TABLE[name]
    assert data.graphs["paper"].concepts_by_category() == {c: n for c, n in per_category.items() if n}
    assert sum(b.units for b in data.graphs["report"].bars) == detectors
    assert len({b.label for b in data.graphs["report"].bars}) == unique


def test_plot_files(small_run: SmallRun) -> None:
    """An SVG of every plot, and nothing else by default; the SVG titles name their counting rule."""
    for layer in ("layer2", "layer3"):
        for stem in LAYER_PLOTS:
            svg = small_run.out / layer / f"{stem}.svg"
            text = " ".join(t.text or "" for t in ET.parse(svg).iter() if t.tag.endswith("text"))
            if stem == "unique_detectors":
                assert RULES["report"] in text and RULES["paper"] not in text
            elif stem == "unique_detectors_paper":
                assert RULES["paper"] in text and RULES["report"] not in text
            else:
                assert RULES["report"] in text and RULES["paper"] in text
            assert not svg.with_suffix(".png").exists() and not svg.with_suffix(".pdf").exists()
    fractions = small_run.out / "detector_fraction_by_layer.svg"
    text = " ".join(t.text or "" for t in ET.parse(fractions).iter() if t.tag.endswith("text"))
    assert RULES["report"] in text and RULES["paper"] in text
    written = small_run.result.written
    assert "layer2/unique_detectors.svg" in written and "detector_fraction_by_layer.svg" in written


def test_png_and_pdf_copies_on_request(small_run: SmallRun, tmp_path: Path) -> None:
    """``plot_formats``: each plot also as PNG and PDF, the same figure; the same numbers give the same bytes."""
    written = PlotsWriter(plot_formats=["pdf", "png"]).write(small_run.result, tmp_path)
    stems = [f"{layer}/{stem}" for layer in ("layer2", "layer3") for stem in LAYER_PLOTS]
    stems.append("detector_fraction_by_layer")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == \
        sorted(f"{stem}.{fmt}" for stem in stems for fmt in ("svg", "png", "pdf"))
    for stem in stems:
        png = Image.open(tmp_path / f"{stem}.png")
        width, height = ET.parse(tmp_path / f"{stem}.svg").getroot().attrib["width"], png.size[1]
        assert png.size[0] == round(float(width.removesuffix("pt")) * 110 / 72)  # the SVG's figure at 110 dpi
        assert height > 300
        pdf = (tmp_path / f"{stem}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") == 1
        assert (tmp_path / f"{stem}.svg").read_bytes() == (small_run.out / f"{stem}.svg").read_bytes()
    again = PlotsWriter(plot_formats=["png", "pdf"]).write(small_run.result, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_an_unknown_plot_format_is_refused() -> None:
    with pytest.raises(DissectionError, match="unknown plot format 'jpg'; choose from svg, png, pdf"):
        PlotsWriter(plot_formats=["jpg"])


def test_layer_fractions(small_run: SmallRun) -> None:
    fractions = layer_fractions(small_run.result)
    for i, layer in enumerate(small_run.result.layers.values()):
        counts = count_detectors(unit_scores(layer), layer.vocabulary.categories)
        for c in layer.vocabulary.categories:
            assert fractions["report"][c][i] == counts.detectors_by_category[c] / layer.units
            assert fractions["paper"][c][i] == counts.paper_units_by_category[c] / layer.units
    # By the report rule a unit counts once: a layer's fractions add up to its fraction of detectors.
    layer2 = small_run.result.layers["layer2"]
    detectors = count_detectors(unit_scores(layer2), layer2.vocabulary.categories).detectors
    assert sum(f[0] for f in fractions["report"].values()) == pytest.approx(detectors / layer2.units)


def test_one_layer_has_no_cross_layer_plot(small_run: SmallRun, tmp_path: Path) -> None:
    result = small_run.result
    one = RunResult(layers={"layer3": result.layers["layer3"]}, provenance=result.provenance)
    written = PlotsWriter().write(one, tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{s}.svg" for s in LAYER_PLOTS)
    # The same numbers give the same bytes (no dates, fixed ids): reports can be diffed and cached.
    data = plot_data("layer3", unit_scores(result.layers["layer3"]), result.layers["layer3"].vocabulary.categories)
    save(draw_bars(data, "report"), tmp_path / "again" / "unique_detectors")
    assert (tmp_path / "again" / "unique_detectors.svg").read_bytes() == \
        (tmp_path / "layer3" / "unique_detectors.svg").read_bytes()


def test_report_plugins_import_no_heavy_framework() -> None:
    """Listing plugins stays instant: the report plugins import neither matplotlib nor torch."""
    code = ("import sys; import netdissection.plugins.reports.plots, netdissection.plugins.reports.html_report, "
            "netdissection.plugins.reports.report_command; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
