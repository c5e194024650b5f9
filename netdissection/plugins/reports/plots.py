"""Plots of the detector counts (matplotlib, Agg canvas, SVG and PNG).

Per layer, in the layer's folder:

- ``unique_detectors.svg``: the paper's bar graph, one bar per unique concept, grouped and coloured by
  category, height = units detecting it, by the report rule (a unit's one label, IoU ≥ 0.04);
- ``unique_detectors_paper.svg``: the same by the paper's per-category rule (best IoU within the
  category > 0.04; a unit can count in several categories);
- ``detectors_by_category.svg``: per category, units and unique concepts by both rules.

For runs of several layers, ``detector_fraction_by_layer.svg`` in the output folder: per layer, the
fraction of units that detect each category, by both rules.

SVG always (the HTML page shows it; its text stays text); PNG and PDF copies when asked for
(``plot_formats``, ``--plot-format``): PNG copies made the plots take 1.5× as long, every run.

Every number plotted comes from :func:`plot_data`/:func:`layer_fractions`, which derive them from the
tally rows and check them against :func:`netdissection.core.scores.count_detectors`; tests compare those
with the tally.csv on disk. Matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError
from ...core.files import atomic_write, layer_dirnames
from ...core.hookspecs import hookimpl
from ...core.scores import DetectorCounts, UnitScore, count_detectors, unit_scores
from ...core.types import DETECTOR_IOU, RunResult
from .report_style import category_colours

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

RULES = {
    "report": f"report rule: one label per unit, IoU ≥ {DETECTOR_IOU}",
    "paper": f"paper rule: per category, best IoU within the category > {DETECTOR_IOU}",
}
#: The formats a plot can be saved in; SVG is always written, the others are copies on request.
FORMATS = ("svg", "png", "pdf")
COPY_FORMATS = FORMATS[1:]
#: What the saver of each format is told, so that the same numbers give the same bytes: no dates, no
#: software version.
METADATA: dict[str, dict[str, Any]] = {"svg": {"Date": None}, "png": {"Software": None},
                                       "pdf": {"CreationDate": None, "Producer": None}}
#: The file stems of each layer's plots (in the layer's folder) with what they show, and the cross-layer plot.
LAYER_PLOTS = {
    "unique_detectors": "unique detectors per concept (report rule)",
    "unique_detectors_paper": "unique detectors per concept (paper rule)",
    "detectors_by_category": "detectors per category (both rules)",
}
LAYERS_PLOT = "detector_fraction_by_layer"


@dataclass(frozen=True)
class Bar:
    """One bar of the unique-detector graph: a concept and the number of units detecting it."""

    category: str
    label: str
    units: int


@dataclass(frozen=True)
class BarGraph:
    """The bars of one rule, grouped by category (vocabulary order), each group by descending count."""

    rule: str  # "report" or "paper"
    bars: tuple[Bar, ...]

    def units_by_category(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for bar in self.bars:
            totals[bar.category] = totals.get(bar.category, 0) + bar.units
        return totals

    def concepts_by_category(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for bar in self.bars:
            totals[bar.category] = totals.get(bar.category, 0) + 1
        return totals


@dataclass(frozen=True)
class PlotData:
    """Everything the plots of one layer show."""

    layer: str
    categories: tuple[str, ...]
    counts: DetectorCounts
    graphs: dict[str, BarGraph]  # by rule


def detector_bars(rows: Sequence[UnitScore], categories: Sequence[str], rule: str,
                  threshold: float = DETECTOR_IOU) -> BarGraph:
    """Units per (category, concept) by ``rule`` ("report" or "paper"), from tally rows."""
    units: dict[tuple[str, str], int] = {}
    for row in rows:
        if rule == "report":
            hits = [(row.category, row.label)] if row.score >= threshold and row.category in categories else []
        elif rule == "paper":
            hits = [(c, row.per_category[c][0]) for c in categories
                    if c in row.per_category and row.per_category[c][1] > threshold]
        else:
            raise ValueError(f"unknown counting rule {rule!r}; known: {', '.join(RULES)}")
        for key in hits:
            units[key] = units.get(key, 0) + 1
    order = {c: i for i, c in enumerate(categories)}
    keys = sorted(units, key=lambda k: (order[k[0]], -units[k], k[1]))
    return BarGraph(rule, tuple(Bar(c, label, units[(c, label)]) for c, label in keys))


def plot_data(layer: str, rows: Sequence[UnitScore], categories: Sequence[str]) -> PlotData:
    """The plotted numbers of a layer; the bars are checked to add up to ``count_detectors``' counts."""
    counts = count_detectors(rows, categories)
    graphs = {rule: detector_bars(rows, categories, rule) for rule in RULES}
    expected = {
        "report": (counts.detectors_by_category, counts.unique_by_category),
        "paper": (counts.paper_units_by_category, counts.paper_unique_by_category),
    }
    for rule, (units, concepts) in expected.items():
        graph = graphs[rule]
        got_units, got_concepts = graph.units_by_category(), graph.concepts_by_category()
        for c in categories:
            if got_units.get(c, 0) != units[c] or got_concepts.get(c, 0) != concepts[c]:
                raise RuntimeError(f"{layer}: the {rule}-rule bars of {c} disagree with count_detectors")
    return PlotData(layer, tuple(categories), counts, graphs)


def layer_fractions(result: RunResult) -> dict[str, dict[str, list[float]]]:
    """Per rule, per category: the fraction of each layer's units detecting it (layers in run order)."""
    fractions: dict[str, dict[str, list[float]]] = {"report": {}, "paper": {}}
    for layer in result.layers.values():
        cats = layer.vocabulary.categories
        counts = count_detectors(unit_scores(layer), cats)
        for c in cats:
            fractions["report"].setdefault(c, []).append(counts.detectors_by_category[c] / max(counts.units, 1))
            fractions["paper"].setdefault(c, []).append(counts.paper_units_by_category[c] / max(counts.units, 1))
    return fractions


# ------------------------------------------------------------------------------------------------ drawing


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas, never pyplot: no global backend switch in the user's process.
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def checked_formats(asked: Sequence[str] | None) -> tuple[str, ...]:
    """SVG and the formats asked for, in :data:`FORMATS` order; an unknown one is an error."""
    unknown = [f for f in asked or () if f not in FORMATS]
    if unknown:
        raise DissectionError(f"unknown plot format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f == "svg" or f in (asked or ()))


def save(figure: Figure, stem: Path, formats: Sequence[str] = ("svg",)) -> list[Path]:
    """``stem``.svg (and ``stem``.png, ``stem``.pdf when ``formats`` name them), written atomically."""
    import matplotlib

    written = []
    # Lay the figure out once, then freeze it: each savefig would otherwise redo the constrained layout.
    # The engine runs on its own, which measures the text it must; draw_without_rendering would also draw
    # every artist for nothing (40% more time; the same bytes either way).
    # No layout engine at all (None), not the "none" placeholder: with any engine set, savefig first draws
    # the whole figure without rendering it, which is a third of the time of each save (same bytes).
    # (A user's matplotlibrc asking for a layout by default would turn None back into that engine.)
    engine = figure.get_layout_engine()
    if engine is not None:
        engine.execute(figure)
    with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        figure.set_layout_engine(None)
    # A fixed hash salt and no date make the SVG the same bytes for the same numbers; text stays text
    # (smaller, searchable, and the rule named in the title can be read back).
    with matplotlib.rc_context({"svg.hashsalt": "netdissection", "svg.fonttype": "none"}):
        for fmt in formats:
            buffer = io.BytesIO()
            figure.savefig(buffer, format=fmt, dpi=110, metadata=METADATA[fmt])
            written.append(atomic_write(stem.with_suffix(f".{fmt}"), lambda f, b=buffer: f.write(b.getvalue())))
    return written


def draw_bars(data: PlotData, rule: str) -> Figure:
    """The paper's figure: a bar per unique concept, grouped and coloured by category."""
    graph = data.graphs[rule]
    colours = category_colours(data.categories)
    n = len(graph.bars)
    figure = _figure(max(6.5, 0.2 * n + 2.0), 4.2)
    axes = figure.add_subplot()
    total = sum(b.units for b in graph.bars)
    units = (f"{total} detector units" if rule == "report"
             else f"{total} units summed over categories (a unit can count in several)")
    figure.suptitle(f"{data.layer}: {len(graph.bars)} unique detectors, {units}\n{RULES[rule]}", fontsize=10)
    if not graph.bars:
        axes.text(0.5, 0.5, "no detectors by this rule", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    # One bar slot of space between category groups.
    positions, x, previous = [], 0, graph.bars[0].category
    for bar in graph.bars:
        if bar.category != previous:
            x, previous = x + 1, bar.category
        positions.append(x)
        x += 1
    axes.bar(positions, [b.units for b in graph.bars], color=[colours[b.category] for b in graph.bars], width=0.8)
    axes.set_xticks(positions, [b.label for b in graph.bars], rotation=90, fontsize=7)
    axes.set_xlim(-0.8, positions[-1] + 0.8)
    axes.set_ylabel("units")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.spines[["top", "right"]].set_visible(False)
    present = [c for c in data.categories if any(b.category == c for b in graph.bars)]
    handles = [_patch(colours[c]) for c in present]
    # Outside the axes, to the right: inside it would cover the tallest bars.
    axes.legend(handles, [f"{c} ({graph.concepts_by_category()[c]})" for c in present], fontsize=8,
                frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="concepts", title_fontsize=8)
    return figure


def _patch(colour: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=colour)


def draw_category_counts(data: PlotData) -> Figure:
    """Per category: units and unique concepts, report rule beside paper rule."""
    counts, cats = data.counts, data.categories
    colours = category_colours(cats)
    figure = _figure(max(6.5, 1.1 * len(cats) + 2.5), 3.6)
    figure.suptitle(f"{data.layer}: detectors per category ({counts.detectors}/{counts.units} units, "
                    f"{counts.unique_labels} concepts by the report rule)\nsolid: {RULES['report']}; "
                    f"hatched: {RULES['paper']}", fontsize=9)
    panels = figure.subplots(1, 2)
    series = {
        "units": (counts.detectors_by_category, counts.paper_units_by_category),
        "unique concepts": (counts.unique_by_category, counts.paper_unique_by_category),
    }
    for axes, (what, (report, paper)) in zip(panels, series.items(), strict=True):
        xs = range(len(cats))
        solid = axes.bar([x - 0.2 for x in xs], [report[c] for c in cats], 0.4, color=[colours[c] for c in cats])
        hatched = axes.bar([x + 0.2 for x in xs], [paper[c] for c in cats], 0.4, color="white",
                           edgecolor=[colours[c] for c in cats], hatch="///")
        axes.bar_label(solid, fontsize=7)
        axes.bar_label(hatched, fontsize=7)
        axes.set_xticks(list(xs), list(cats), rotation=30, fontsize=8)
        axes.set_title(what, fontsize=9)
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.spines[["top", "right"]].set_visible(False)
    return figure


def draw_layer_fractions(result: RunResult) -> Figure:
    """Per category, the fraction of units detecting it in each layer: report rule (stacked: they add up to
    the layer's detector fraction) beside the paper rule (lines: a unit may count in several categories)."""
    fractions = layer_fractions(result)
    layers = list(result.layers)
    cats = list(fractions["report"])
    colours = category_colours(cats)
    figure = _figure(max(8.0, 1.3 * len(layers) + 4.0), 3.8)
    figure.suptitle("fraction of units that detect each category, by layer", fontsize=10)
    report_axes, paper_axes = figure.subplots(1, 2, sharey=True)
    xs = list(range(len(layers)))
    bottom = [0.0] * len(layers)
    for c in cats:
        values = fractions["report"][c]
        report_axes.bar(xs, values, 0.6, bottom=bottom, color=colours[c], label=c)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        paper_axes.plot(xs, fractions["paper"][c], marker="o", color=colours[c], label=c)
    for axes, rule in ((report_axes, "report"), (paper_axes, "paper")):
        axes.set_title(RULES[rule], fontsize=8)
        axes.set_xticks(xs, layers, rotation=30, fontsize=8)
        axes.spines[["top", "right"]].set_visible(False)
    report_axes.set_ylabel("fraction of units")
    paper_axes.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


class PlotsWriter:
    """Writes the plots; without matplotlib (the ``report`` extra) it logs how to get them and writes none.

    Each figure is drawn and saved by its own task, spread over the cores (:mod:`.parallel`), the figures
    with the most bars first; the files are listed in the same order whatever ran where. ``plot_formats``:
    "png", "pdf": copies beside the SVG."""

    def __init__(self, workers: int | None = None, plot_formats: Sequence[str] | None = None) -> None:
        self.workers = workers
        self.formats = checked_formats(plot_formats)

    def write(self, result: RunResult, out_dir: Path) -> list[Path]:
        try:
            # Imported here, once, before the workers fork: they inherit it instead of importing it each.
            import matplotlib.backends.backend_agg
            import matplotlib.figure  # noqa: F401
        except ImportError:
            log.warning("plots skipped: they need matplotlib; install it with: pip install 'netdissection[report]'")
            return []
        from .parallel import run_tasks

        folders = layer_dirnames(result.layers)
        formats = self.formats

        def task(draw: Any, stem: Path) -> Any:  # draw() makes the figure, in the worker
            return lambda: save(draw(), stem, formats)

        jobs: list[tuple[int, Any]] = []  # (bars drawn: the cost, task)
        for name, layer in result.layers.items():
            data = plot_data(name, unit_scores(layer), layer.vocabulary.categories)
            bars, paper, counts = (out_dir / folders[name] / stem for stem in LAYER_PLOTS)  # LAYER_PLOTS order
            jobs += [(len(data.graphs["report"].bars), task(functools.partial(draw_bars, data, "report"), bars)),
                     (len(data.graphs["paper"].bars), task(functools.partial(draw_bars, data, "paper"), paper)),
                     (len(data.categories), task(functools.partial(draw_category_counts, data), counts))]
        if len(result.layers) > 1:
            jobs.append((len(result.layers), task(functools.partial(draw_layer_fractions, result),
                                                  out_dir / LAYERS_PLOT)))
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0])
        done = run_tasks([jobs[i][1] for i in order], self.workers)
        files = dict(zip(order, done, strict=True))
        return [path for i in range(len(jobs)) for path in files[i]]


@hookimpl
def dissect_register_reporters(register) -> None:  # type: ignore[no-untyped-def]
    register("plots", PlotsWriter, description="bar graphs of unique detectors per category (both counting "
             "rules), SVG (PNG, PDF with --plot-format); across layers for multi-layer runs", default=True)
