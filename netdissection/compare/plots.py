"""The comparison's plots (SVG and PNG), drawn from the table's rows only.

- ``unique_detectors_by_model``: the paper's architecture figure: per (model, layer) the unique detectors
  (concepts) per category as stacked bars, by the report rule beside the paper rule;
- ``detectors_vs_x``: for checkpoint series, detectors per category against the checkpoints' x (the paper's
  "detectors vs epoch"; a log axis when the x values span decades), the random baseline dashed. Series are
  grouped by architecture, layer, labels (``--label dropout=0.5``) and rotation; with several groups the
  figure has one panel for the totals of each rule and one per category, each with one line per group;
- ``detectors_vs_rotation``: for ``--rotate`` with several α, unique concepts per category against α (the
  paper's rotation figure), one line per category, or one per group with several groups;
- ``detectors_by_layer``: for models dissected at several layers (``--layer stage:*``), unique concepts
  per category across the layers, one panel per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.types import DETECTOR_IOU
from .rows import FAILED, categories_of

REPORT_RULE = f"report rule: one label per unit, IoU ≥ {DETECTOR_IOU}"
PAPER_RULE = f"paper rule: per category, best IoU within the category > {DETECTOR_IOU}"
PLOTS = {
    "unique_detectors_by_model": "unique detectors per category, per model (both counting rules)",
    "detectors_vs_x": "detectors per category against the checkpoints' x",
    "detectors_vs_rotation": "unique concepts per category against the rotation α of the units' basis",
    "detectors_by_layer": "unique concepts per category across layers",
}
#: x values spanning at least this ratio get a log axis.
LOG_SPAN = 100.0
#: A comparison has a few figures, the ones that go into papers and slides: each as SVG and PNG.
FORMATS = ("svg", "png")

Row = Mapping[str, Any]


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """Every plot the rows allow; returns the files written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover - matplotlib is a base dependency
        return []
    from ..plugins.reports.plots import save

    done = [r for r in rows if r.get("status") != FAILED]
    categories = categories_of(done)
    written: list[Path] = []
    if done and categories:
        written += save(draw_by_model(done, categories), out / "unique_detectors_by_model", FORMATS)
    series = x_series(done)
    if series:
        written += save(draw_vs_x(series, categories), out / "detectors_vs_x", FORMATS)
    rotations = rotation_series(done)
    if rotations:
        written += save(draw_vs_rotation(rotations, categories), out / "detectors_vs_rotation", FORMATS)
    layered = by_layer(done)
    if layered:
        written += save(draw_by_layer(layered, categories), out / "detectors_by_layer", FORMATS)
    return written


def row_label(row: Row, rows: Sequence[Row]) -> str:
    """A row's name on an axis: the model, and the layer (the rotation) when the model has rows at several."""
    same = [r for r in rows if r.get("model") == row.get("model")]
    name = str(row["model"])
    if len({r.get("layer") for r in same}) > 1 and row.get("layer"):
        name += f" · {row['layer']}"
    if len({r.get("rotate") for r in same}) > 1 and row.get("rotate") is not None:
        name += f" · α={row['rotate']:g}"
    return name


# ---- what is plotted -------------------------------------------------------------------------------------------

def x_series(rows: Sequence[Row]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Rows with an x value, grouped into series by (architecture, layer, labels); each series with its points
    sorted by x and its random baseline (a row of the same group without x and with random weights)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        if row.get("x") is None:
            continue
        groups.setdefault(_series_key(row), {"points": [], "baseline": None})["points"].append(row)
    for row in rows:
        if row.get("x") is None and str(row.get("weights") or "").startswith("random") and _series_key(row) in groups:
            groups[_series_key(row)]["baseline"] = row
    for group in groups.values():
        group["points"].sort(key=lambda r: r["x"])
    return groups


def _series_key(row: Row) -> tuple[str, str, str]:
    arch = str(row["model"]).split("@", 1)[0].removesuffix(" (random)")
    return arch, str(row.get("layer") or ""), _tags(row)


def _tags(row: Row, *, rotation: bool = True) -> str:
    """A row's labels (and its rotation) as the name of its group."""
    tags = [f"{k}={v}" for k, v in sorted((row.get("labels") or {}).items())]
    if rotation and row.get("rotate") is not None:
        tags.append(f"α={row['rotate']:g}")
    return ", ".join(tags)


def rotation_series(rows: Sequence[Row]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Rows dissected at several rotations α of one model (same weights, layer, labels, x), grouped; each
    group's points sorted by α. Groups with one α are left out (nothing to draw a line through)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        if row.get("rotate") is None:
            continue
        where = f"x={row['x']:g}" if row.get("x") is not None else ""
        key = (str(row["model"]), str(row.get("layer") or ""), ", ".join(t for t in (_tags(row, rotation=False), where)
                                                                           if t))
        groups.setdefault(key, {"points": [], "baseline": None})["points"].append(row)
    for group in groups.values():
        group["points"].sort(key=lambda r: r["rotate"])
    return {k: g for k, g in groups.items() if len({r["rotate"] for r in g["points"]}) >= 2}


def x_scale(xs: Sequence[float]) -> str:
    """'log' when the positive x values span decades ('symlog' when 0 is among them), else 'linear'."""
    positive = [x for x in xs if x > 0]
    if len(positive) < 2 or max(positive) / min(positive) < LOG_SPAN:
        return "linear"
    return "symlog" if any(x <= 0 for x in xs) else "log"


def by_layer(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Per model (and rotation) with at least two layers (and no x series), its rows in run order."""
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        if row.get("x") is None and row.get("layer"):
            name = str(row["model"]) + (f" · α={row['rotate']:g}" if row.get("rotate") is not None else "")
            grouped.setdefault(name, []).append(row)
    return {m: rs for m, rs in grouped.items() if len({r["layer"] for r in rs}) >= 2}


# ---- drawing -------------------------------------------------------------------------------------------------

def _colours(categories: Sequence[str]) -> dict[str, str]:
    from ..plugins.reports.report_style import category_colours

    return category_colours(categories)


def draw_by_model(rows: Sequence[Row], categories: Sequence[str]) -> Any:
    from ..plugins.reports.plots import _figure

    colours = _colours(categories)
    labels = [row_label(r, rows) for r in rows]
    figure = _figure(11.0, max(2.6, 0.32 * len(rows) + 1.6))
    figure.suptitle("unique detectors (concepts) per category", fontsize=10)
    panels = figure.subplots(1, 2, sharey=True)
    ys = list(range(len(rows)))
    for axes, (suffix, rule) in zip(panels, (("unique", REPORT_RULE), ("paper_unique", PAPER_RULE)), strict=True):
        left = [0.0] * len(rows)
        for c in categories:
            values = [float(r.get(f"{c}_{suffix}") or 0) for r in rows]
            axes.barh(ys, values, 0.7, left=left, color=colours[c], label=c)
            left = [a + b for a, b in zip(left, values, strict=True)]
        for y, total in zip(ys, left, strict=True):
            axes.text(total, y, f" {total:g}", va="center", fontsize=7)
        axes.set_title(rule, fontsize=8)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.spines[["top", "right"]].set_visible(False)
    panels[0].set_yticks(ys, labels, fontsize=8)
    panels[0].invert_yaxis()  # the first row on top (the axis is shared)
    panels[1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="category",
                     title_fontsize=7)
    return figure


@dataclass
class Curve:
    """One line of a panel: a category's or a group's values at the series' x values."""

    label: str
    colour: str
    xs: list[float]
    ys: list[float]
    style: str = "-"
    marker: str = "o"
    baseline: float | None = None  # the group's random model, drawn as a dashed horizontal line


@dataclass
class Panel:
    title: str
    curves: list[Curve] = field(default_factory=list)


def group_name(key: tuple[str, ...], keys: Sequence[tuple[str, ...]]) -> str:
    """A group's name in a legend: what tells it from the other groups (its own labels, when only labels
    differ: ``dropout=0.5``), else its whole key."""
    shared = set.intersection(*({t for t in k[-1].split(", ") if t} for k in keys))
    differing = [key[i] for i in range(len(key) - 1) if len({k[i] for k in keys}) > 1 and key[i]]
    tags = [t for t in key[-1].split(", ") if t and t not in shared]
    return " · ".join([*differing, ", ".join(tags)] if tags else differing) or " · ".join(p for p in key if p)


def curve_panels(series: Mapping[tuple[str, str, str], Mapping[str, Any]], categories: Sequence[str],
                 x_field: str = "x") -> list[Panel]:
    """What the curves of ``series`` show, panel by panel (the figure is drawn from exactly this).

    One group: two panels (detectors per category by the report rule, unique concepts per category by the
    paper rule), one line per category. Several groups: the totals of each rule, then unique concepts of each
    category by the paper rule, each panel with one line per group, coloured by group."""
    from ..plugins.reports.report_style import category_colours

    def values(rows: Sequence[Row], column: str) -> list[float]:
        return [float(r.get(column) or 0) for r in rows]

    def baseline(group: Mapping[str, Any], column: str) -> float | None:
        row = group.get("baseline")
        return None if row is None else float(row.get(column) or 0)

    if len(series) == 1:
        (group,) = series.values()
        points = group["points"]
        xs = [float(r[x_field]) for r in points]
        colours = category_colours(categories)
        return [Panel(title, [Curve(c, colours[c], xs, values(points, f"{c}_{suffix}"),
                                    baseline=baseline(group, f"{c}_{suffix}")) for c in categories])
                for suffix, title in (("detectors", f"detectors, {REPORT_RULE}"),
                                      ("paper_unique", f"unique concepts, {PAPER_RULE}"))]
    keys = list(series)
    palette = GROUP_COLOURS
    columns = [("detectors", "all categories: detectors (report rule)"),
               ("paper_unique", "all categories: unique concepts (paper rule)"),
               *((f"{c}_paper_unique", f"{c}: unique concepts (paper rule)") for c in categories)]
    panels = []
    for column, title in columns:
        panel = Panel(title)
        for i, (key, group) in enumerate(series.items()):
            points = group["points"]
            panel.curves.append(Curve(group_name(key, keys), palette[i % len(palette)],
                                      [float(r[x_field]) for r in points], values(points, column),
                                      style=GROUP_STYLES[i % len(GROUP_STYLES)],
                                      marker=GROUP_MARKERS[i % len(GROUP_MARKERS)],
                                      baseline=baseline(group, column)))
        panels.append(panel)
    return panels


#: Colours and line styles of groups (matplotlib's tab10 without the greys).
GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
GROUP_STYLES = ("-", "--", "-.", ":")  # a group drawn over another of the same values still shows
GROUP_MARKERS = ("o", "s", "^", "D", "v")


def draw_curves(panels: Sequence[Panel], title: str, xlabel: str, scale: str = "linear",
                legend_title: str | None = None) -> Any:
    """The panels side by side (two) or in a grid (more), x ticks at each x when there are few."""
    from ..plugins.reports.plots import _figure

    columns = min(len(panels), 2 if len(panels) <= 2 else 4)
    grid_rows = math.ceil(len(panels) / columns)
    figure = _figure(11.0 if columns == 2 else 15.0, 4.2 if grid_rows == 1 else 3.1 * grid_rows + 0.8)
    figure.suptitle(title, fontsize=10)
    axes_grid = figure.subplots(grid_rows, columns, squeeze=False)
    xs = [x for panel in panels for curve in panel.curves for x in curve.xs]
    for axes, panel in zip(axes_grid.flat, panels, strict=False):
        for curve in panel.curves:
            axes.plot(curve.xs, curve.ys, curve.style, marker=curve.marker, markersize=3, color=curve.colour,
                      label=curve.label)
            if curve.baseline is not None:
                axes.axhline(curve.baseline, color=curve.colour, linestyle=(0, (2, 3)), linewidth=0.9, alpha=0.7)
        if scale == "symlog":
            axes.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
        elif scale == "log":
            axes.set_xscale("log")
        if len(set(xs)) <= 12:  # few points: a tick at each, labelled with its own x
            ticks = sorted(set(xs))
            axes.set_xticks(ticks, [f"{x:g}" for x in ticks], fontsize=8)
            axes.xaxis.set_minor_locator(_null_locator())
        highest = max((y for curve in panel.curves for y in [*curve.ys, curve.baseline or 0.0]), default=0.0)
        axes.set_ylim(0, max(1.0, highest) * 1.08)  # counts: from 0, and a flat line is not magnified
        axes.set_title(panel.title, fontsize=8)
        axes.set_xlabel(xlabel + (", log scale" if scale != "linear" else ""), fontsize=8)
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.spines[["top", "right"]].set_visible(False)
    for axes in list(axes_grid.flat)[len(panels):]:
        axes.set_axis_off()
    axes_grid.flat[columns - 1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                                       title=legend_title, title_fontsize=7)
    return figure


def draw_vs_x(series: Mapping[tuple[str, str, str], Mapping[str, Any]], categories: Sequence[str]) -> Any:
    xs = [float(r["x"]) for g in series.values() for r in g["points"]]
    # The note on the dashed baseline only where one is drawn: a second group's line is dashed too.
    has_baseline = any(g.get("baseline") is not None for g in series.values())
    title = "detectors per category against the checkpoints' x" + (
        " (dashed horizontal: random weights)" if has_baseline else "")
    if len(series) > 1:
        title = ("detectors against the checkpoints' x, one line per group"
                 + (" (dashed horizontal: the group's random weights)" if has_baseline else "")
                 + f"\n{REPORT_RULE}; {PAPER_RULE}")
    return draw_curves(curve_panels(series, categories, "x"), title, "x (from the checkpoint names)", x_scale(xs),
                       legend_title="category" if len(series) == 1 else "group")


def draw_vs_rotation(series: Mapping[tuple[str, str, str], Mapping[str, Any]], categories: Sequence[str]) -> Any:
    title = "detectors against the rotation of the units' basis: Q^α, Q a random rotation (α = 0: the units as is)"
    if len(series) > 1:
        title += f"\n{REPORT_RULE}; {PAPER_RULE}"
    return draw_curves(curve_panels(series, categories, "rotate"), title, "α",
                       legend_title="category" if len(series) == 1 else "group")


def _null_locator() -> Any:
    from matplotlib.ticker import NullLocator

    return NullLocator()


def draw_by_layer(layered: Mapping[str, Sequence[Row]], categories: Sequence[str]) -> Any:
    from ..plugins.reports.plots import _figure

    colours = _colours(categories)
    count = len(layered)
    columns = min(count, 3)
    grid_rows = math.ceil(count / columns)
    figure = _figure(4.2 * columns + 1.6, 3.2 * grid_rows + 0.6)
    figure.suptitle(f"unique concepts per category across layers; solid: {PAPER_RULE}; dashed: {REPORT_RULE}",
                    fontsize=9)
    axes_grid = figure.subplots(grid_rows, columns, squeeze=False)
    for axes, (model, rows) in zip(axes_grid.flat, layered.items(), strict=False):
        xs = list(range(len(rows)))
        for c in categories:
            axes.plot(xs, [float(r.get(f"{c}_paper_unique") or 0) for r in rows], marker="o", markersize=3,
                      color=colours[c], label=c)
            axes.plot(xs, [float(r.get(f"{c}_unique") or 0) for r in rows], linestyle="--", color=colours[c],
                      linewidth=0.9)
        names = [f"{r['layer']}\n{r['module']}" if r.get("module") and r["module"] != r["layer"] else str(r["layer"])
                 for r in rows]
        axes.set_xticks(xs, names, fontsize=7, rotation=30)
        axes.set_title(model, fontsize=9)
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.spines[["top", "right"]].set_visible(False)
    for axes in list(axes_grid.flat)[count:]:
        axes.set_axis_off()
    axes_grid.flat[columns - 1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure
