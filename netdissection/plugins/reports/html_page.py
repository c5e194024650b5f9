"""The markup of the HTML report (see :mod:`netdissection.plugins.reports.html_report`).

Cards carry their sort keys as ``data-`` attributes (unit, iou, label, cat) and the inline script
reorders and hides them; the markup is kept terse because a 512-unit layer has 512 cards.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...core.files import layer_dirnames
from ...core.reporting import random_weights
from ...core.scores import DetectorCounts, UnitScore, count_detectors, unit_scores
from ...core.types import DETECTOR_IOU, Explanation, LayerResult, RunResult, layer_described
from . import html_bootstrap
from .html_assets import CSS, JS
from .html_report import FILES
from .plots import LAYER_PLOTS, LAYERS_PLOT
from .report_style import category_colours
from .strips import Strip


def render_page(result: RunResult, strips: Mapping[str, Mapping[int, Strip]], staging: Path,
                notices: Sequence[str], out_dir: Path) -> str:
    """The whole page; strip files are referenced where they will be once ``staging`` becomes FILES.
    Plots already in ``out_dir`` (the plots writer runs first) are shown in a folded section."""
    provenance = result.provenance
    model = provenance.get("model", "model")
    categories = next(iter(result.layers.values())).vocabulary.categories if result.layers else ()
    colours = category_colours(categories)
    folders = layer_dirnames(result.layers)
    scored = {name: unit_scores(layer) for name, layer in result.layers.items()}
    counts = {name: count_detectors(rows, categories) for name, rows in scored.items()}
    # Only a run of several layers has a cross-layer plot (an older one may lie in a reused folder).
    across_layers = [(LAYERS_PLOT, "fraction of units detecting each category, by layer")] * (len(result.layers) > 1)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request: nothing to fetch, no console error
        f"<title>Network dissection: {escape(model)}</title>",
        f"<style>{CSS}{_category_css(colours)}"
        f"{html_bootstrap.CSS if any(layer.bootstrap for layer in result.layers.values()) else ''}</style>",
        "</head><body>",
        _page_header(result, _plots(out_dir, across_layers)),
        *(f'<p class="notice">{escape(n)}</p>' for n in notices),
        _toolbar(categories, colours, counts),
    ]
    for name, layer in result.layers.items():
        src = {unit: f"{FILES}/{strip.path.relative_to(staging).as_posix()}"
               for unit, strip in strips.get(name, {}).items()}
        plots = _plots(out_dir, [(f"{folders[name]}/{stem}", what) for stem, what in LAYER_PLOTS.items()])
        parts.append(_layer_section(name, folders[name], layer, scored[name], counts[name], src,
                                    strips.get(name, {}), categories, plots))
    parts += [
        f'<footer>Written by netdissection {escape(provenance.get("netdissection", ""))}. '
        f"A unit is a detector when the IoU of its best concept is ≥ {DETECTOR_IOU} (the report rule); "
        "the paper's figures count per category the units whose best IoU within the category is "
        f"&gt; {DETECTOR_IOU}. Masks: each unit's activation map upsampled bilinearly to the image and "
        "thresholded at its top-quantile level; outside the mask the image is dimmed.</footer>",
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _plots(out_dir: Path, plots: Sequence[tuple[str, str]]) -> str:
    """A folded section with the plots that exist (SVG, lazy: nothing loads until it is opened)."""
    present = [(stem, what) for stem, what in plots if (out_dir / f"{stem}.svg").is_file()]
    if not present:
        return ""
    figures = "".join(f'<figure><img loading="lazy" src="{escape(stem)}.svg" alt="{escape(what)}">'
                      f"<figcaption>{escape(what)}</figcaption></figure>" for stem, what in present)
    return f'<details class="plots"><summary>plots</summary>{figures}</details>'


def _category_css(colours: Mapping[str, str]) -> str:
    return "".join(f".c{i}{{--cat:{colour}}}" for i, colour in enumerate(colours.values()))


def _rule_text(rule: Mapping[str, Any]) -> str:
    """The threshold rule as provenance records it: ``{"name", "plugin", "params"}`` (older runs: flat)."""
    params = rule.get("params")
    if params is None:
        params = {k: v for k, v in rule.items() if k not in ("name", "plugin")}
    if rule.get("name", "quantile") == "quantile" and "q" in params:
        return f"top {params['q']} quantile per unit"
    settings = ", ".join(f"{k}={v}" for k, v in params.items() if k != "compat")
    return f"{rule.get('name', '?')} rule" + (f" ({settings})" if settings else "")


def _page_header(result: RunResult, plots: str) -> str:
    p = result.provenance
    dataset = p.get("dataset") or {}
    rule = p.get("threshold_rule") or {}
    rows = [
        ("model", p.get("model", "?")),
        ("backend", p.get("backend", "?")),
        ("dataset", f"{dataset.get('format', '?')} at {dataset.get('path', '?')} "
                    f"({dataset.get('images', result.images)} images, {len(dataset.get('categories', []))} "
                    "categories)"),
        ("layers", ", ".join(result.layers)),
        ("threshold", f"{_rule_text(rule)} ({p.get('semantics', 'paper')} semantics)"),
        ("run", p.get("started", "")),
    ]
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    nav = ""
    if len(result.layers) > 1:
        folders = layer_dirnames(result.layers)
        links = " · ".join(f'<a href="#layer-{escape(folders[n])}">{escape(n)}</a>' for n in result.layers)
        nav = f"<p>Layers: {links}</p>"
    seed = random_weights(p)
    untrained = (f'<p class="notice">random weights, seed {seed["seed"]}: not a trained model</p>'
                 if seed is not None else "")
    return (f'<header class="page"><h1>Network dissection of {escape(p.get("model", "model"))}</h1>{untrained}'
            f'<dl class="meta">{items}</dl>{nav}{plots}</header>')


def _toolbar(categories: Sequence[str], colours: Mapping[str, str], counts: Mapping[str, DetectorCounts]) -> str:
    sorts = "".join(f'<button type="button" data-sort="{key}">{label}</button>'
                    for key, label in (("unit", "unit"), ("iou", "IoU"), ("label", "label"),
                                       ("category", "category")))
    total = {c: sum(n.detectors_by_category[c] for n in counts.values()) for c in categories}
    chips = ['<button type="button" data-filter="">all</button>']
    for c in categories:
        chips.append(f'<button type="button" data-filter="{escape(c)}" title="{total[c]} detectors">'
                     f'<span class="swatch" style="background:{colours[c]}"></span>{escape(c)}</button>')
    return ('<nav class="toolbar">'
            f'<div class="group"><span class="name">sort by</span>{sorts}</div>'
            f'<div class="group"><span class="name">category</span>{"".join(chips)}</div>'
            '<label><input type="checkbox" id="detectors-only"> detectors only</label></nav>')


def _counts_table(counts: DetectorCounts, categories: Sequence[str], intervals: Mapping[str, Any] | None = None
                  ) -> str:
    def ci(key: str, category: str | None = None) -> str:  # the bootstrap's interval, when there is one
        value = (intervals or {}).get(key)
        return html_bootstrap.interval(value.get(category) if category is not None and value else value)

    head = ("<tr><th>category</th><th>detectors</th><th>unique concepts</th>"
            "<th>paper: units</th><th>paper: unique</th></tr>")
    body = "".join(
        f"<tr><td>{escape(c)}</td><td>{counts.detectors_by_category[c]}{ci('detectors_by_category', c)}</td>"
        f"<td>{counts.unique_by_category[c]}{ci('unique_labels_by_category', c)}</td>"
        f"<td>{counts.paper_units_by_category[c]}{ci('paper_units_by_category', c)}</td>"
        f"<td>{counts.paper_unique_by_category[c]}{ci('paper_unique_labels_by_category', c)}</td></tr>"
        for c in categories)
    total = (f"<tr><th>all</th><th>{counts.detectors}{ci('detectors')}</th><th>{counts.unique_labels}"
             f"{ci('unique_labels')}</th><th>–</th><th>{counts.paper_unique_total}{ci('paper_unique_labels_total')}"
             "</th></tr>")
    caption = (f"<caption>detectors, unique concepts: one label per unit, IoU ≥ {DETECTOR_IOU} (report rule). "
               f"paper: per category, units whose best IoU within the category is &gt; {DETECTOR_IOU}, and "
               "their unique concepts (a unit can count in several categories).</caption>")
    return f'<table class="counts">{caption}{head}{body}{total}</table>'


def _layer_section(name: str, folder: str, layer: LayerResult, rows: Sequence[UnitScore], counts: DetectorCounts,
                   src: Mapping[int, str], strips: Mapping[int, Strip], categories: Sequence[str],
                   plots: str) -> str:
    index = {c: i for i, c in enumerate(categories)}
    boot = layer.bootstrap
    explained = {e.unit: e for e in layer.explanations or ()}
    cards = [_card(row, index, src.get(row.unit - 1), strips.get(row.unit - 1),
                   html_bootstrap.card_parts(boot, row.unit - 1), explained.get(row.unit)) for row in rows]
    headline = (f"{counts.detectors}/{counts.units} units are detectors covering {counts.unique_labels} concepts "
                f"(IoU ≥ {DETECTOR_IOU})")
    warnings = "".join(f'<p class="notice warning">{escape(w)}</p>' for w in layer.warnings)
    return (f'<section class="layer" id="layer-{escape(folder)}"><header><h2>{escape(name)}</h2>'
            f'<span class="module">{escape(layer_described(layer))}</span>'
            f'<span class="headline">{escape(headline)}</span>'
            f'<span class="shown" id="grid-{escape(folder)}-shown"></span></header>{warnings}'
            f"{_counts_table(counts, categories, boot.counts if boot else None)}{html_bootstrap.layer_note(boot)}"
            f"{plots}"
            f'<div class="grid" id="grid-{escape(folder)}">{"".join(cards)}</div></section>')


def _card(row: UnitScore, category_index: Mapping[str, int], src: str | None, strip: Strip | None,
          bootstrap: tuple[str, str] = ("", ""), explanation: Explanation | None = None) -> str:
    detector = row.score >= DETECTOR_IOU
    classes = ["card", "det" if detector else "below"]
    if row.category in category_index:
        classes.append(f"c{category_index[row.category]}")
    if bootstrap[0]:
        classes.append(bootstrap[0])
    image = ""
    if src is not None and strip is not None:
        described = ", ".join(f"#{i} ({peak:.3g})" for i, peak in strip.tiles)
        image = (f'<img class="strip" loading="lazy" decoding="async" src="{escape(src)}" width="{strip.width}" '
                 f'height="{strip.height}" alt="top images of unit {row.unit}" '
                 f'title="dataset images (peak activation): {escape(described)}">')
    return (f'<div class="{" ".join(classes)}" data-unit="{row.unit}" data-iou="{row.score:.6g}" '
            f'data-label="{escape(row.label)}" data-cat="{escape(row.category)}">'
            f'<div class="info"><span class="unit">unit {row.unit}</span><span class="label">{escape(row.label)}'
            f'</span><span class="cat">{escape(row.category)}</span><span class="iou">IoU {row.score:.3f}</span>'
            f"{bootstrap[1]}{_formula(explanation)}</div>{image}</div>")


def _formula(explanation: Explanation | None) -> str:
    """The unit's explanation (``--explain``), on a line of its own in the card."""
    if explanation is None:
        return ""
    return (f'<span class="formula" style="flex-basis:100%" title="explanation of length {explanation.length}">'
            f"{escape(explanation.formula)} <span class=\"iou\">IoU {explanation.iou:.3f}</span></span>")

