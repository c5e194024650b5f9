"""The comparison's plots (SVG and PNG), drawn from the table's rows only.

- ``unique_detectors_by_model``: the paper's architecture figure: per (model, layer) the unique detectors
  (concepts) per category as stacked bars, by the report rule beside the paper rule;
- ``detectors_vs_x``: for checkpoint series, detectors per category against the checkpoints' x (the paper's
  "detectors vs epoch"; a log axis when the x values span decades), the random baseline dashed;
- ``detectors_by_layer``: for models dissected at several layers (``--layer stage:*``), unique concepts
  per category across the layers, one panel per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.types import DETECTOR_IOU
from .rows import FAILED, categories_of

REPORT_RULE = f"report rule: one label per unit, IoU ≥ {DETECTOR_IOU}"
PAPER_RULE = f"paper rule: per category, best IoU within the category > {DETECTOR_IOU}"
PLOTS = {
    "unique_detectors_by_model": "unique detectors per category, per model (both counting rules)",
    "detectors_vs_x": "detectors per category against the checkpoints' x",
    "detectors_by_layer": "unique concepts per category across layers",
}
#: x values spanning at least this ratio get a log axis.
LOG_SPAN = 100.0

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
        written += save(draw_by_model(done, categories), out / "unique_detectors_by_model")
    series = x_series(done)
    if series:
        written += save(draw_vs_x(series, categories), out / "detectors_vs_x")
    layered = by_layer(done)
    if layered:
        written += save(draw_by_layer(layered, categories), out / "detectors_by_layer")
    return written


def row_label(row: Row, rows: Sequence[Row]) -> str:
    """A row's name on an axis: the model, and the layer when the model has several rows."""
    same = [r for r in rows if r.get("model") == row.get("model")]
    return f"{row['model']} · {row['layer']}" if len(same) > 1 and row.get("layer") else str(row["model"])


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
    labels = ", ".join(f"{k}={v}" for k, v in sorted((row.get("labels") or {}).items()))
    return arch, str(row.get("layer") or ""), labels


def x_scale(xs: Sequence[float]) -> str:
    """'log' when the positive x values span decades ('symlog' when 0 is among them), else 'linear'."""
    positive = [x for x in xs if x > 0]
    if len(positive) < 2 or max(positive) / min(positive) < LOG_SPAN:
        return "linear"
    return "symlog" if any(x <= 0 for x in xs) else "log"


def by_layer(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Per model with at least two layers (and no x series), its rows in run order."""
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        if row.get("x") is None and row.get("layer"):
            grouped.setdefault(str(row["model"]), []).append(row)
    return {m: rs for m, rs in grouped.items() if len(rs) >= 2}


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


def draw_vs_x(series: Mapping[tuple[str, str, str], Mapping[str, Any]], categories: Sequence[str]) -> Any:
    from ..plugins.reports.plots import _figure

    colours = _colours(categories)
    styles = ["-", "--", ":", "-."]
    figure = _figure(11.0, 4.2)
    figure.suptitle("detectors per category against the checkpoints' x (dashed horizontal: random weights)",
                    fontsize=10)
    panels = figure.subplots(1, 2, sharex=True)
    xs = [float(r["x"]) for g in series.values() for r in g["points"]]
    scale = x_scale(xs)
    for axes, (suffix, title) in zip(panels, (("detectors", f"detectors, {REPORT_RULE}"),
                                              ("paper_unique", f"unique concepts, {PAPER_RULE}")), strict=True):
        for i, (key, group) in enumerate(series.items()):
            name = " · ".join(p for p in key if p)
            points = group["points"]
            for c in categories:
                ys = [float(r.get(f"{c}_{suffix}") or 0) for r in points]
                axes.plot([r["x"] for r in points], ys, styles[i % len(styles)], marker="o", markersize=3,
                          color=colours[c], label=f"{c} ({name})" if len(series) > 1 else c)
                baseline = group.get("baseline")
                if baseline is not None:
                    axes.axhline(float(baseline.get(f"{c}_{suffix}") or 0), color=colours[c], linestyle=(0, (2, 3)),
                                 linewidth=0.9, alpha=0.7)
        if scale == "symlog":
            axes.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
        elif scale == "log":
            axes.set_xscale("log")
        if len(set(xs)) <= 12:  # few checkpoints: a tick at each, labelled with its own x
            ticks = sorted(set(xs))
            axes.set_xticks(ticks, [f"{x:g}" for x in ticks], fontsize=8)
            axes.xaxis.set_minor_locator(_null_locator())
        axes.set_title(title, fontsize=8)
        axes.set_xlabel("x (from the checkpoint names)" + (", log scale" if scale != "linear" else ""), fontsize=8)
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.spines[["top", "right"]].set_visible(False)
    panels[1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


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
