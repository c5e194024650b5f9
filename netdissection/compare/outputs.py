"""The comparison's files in OUT/: compare.csv, index.html, the plots, and compare.json (written last)."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_text
from .plots import PLOTS, write_plots
from .rows import COUNTING_RULES, FAILED, categories_of, columns

CSV = "compare.csv"
JSON = "compare.json"
PAGE = "index.html"
FORMAT = "netdissection-compare/1"


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, about: Mapping[str, Any]) -> list[Path]:
    """Write every file of the comparison; ``about`` (dataset, rule, executor, store) goes into compare.json
    and the page's header. compare.json comes last: its presence marks a complete comparison."""
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out / CSV, csv_text(rows))]
    plots = write_plots(rows, out)
    written += plots
    written.append(atomic_write_text(out / PAGE, page(rows, about, [p for p in plots if p.suffix == ".svg"], out)))
    document = {"format": FORMAT, "counting_rules": COUNTING_RULES, "categories": categories_of(rows),
                **dict(about), "rows": list(rows)}
    written.append(atomic_write_text(out / JSON, json.dumps(document, indent=1, default=str) + "\n"))
    return written


def csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return ";".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return value


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    header = columns(rows)
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in header])
    return buffer.getvalue()


# ---- index.html ------------------------------------------------------------------------------------------------

_SHOWN = ("model", "x", "rotate", "labels", "layer", "module", "map", "units", "detectors", "unique", "paper_unique",
          "mean_iou", "images", "seconds", "cached")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.5em 0 1em}
dl.meta dt{color:#666}
table{border-collapse:collapse;font-size:13px}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{position:sticky;top:0;background:#f4f4f4;cursor:pointer;user-select:none}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.text,th.text{text-align:left}
tr.failed td{color:#a00}
td.error{white-space:normal;max-width:40em;text-align:left}
.rules{color:#555;font-size:12px;max-width:70em}
figure{margin:1em 0}figure img{max-width:100%}
"""

# Sorts by the clicked column: numbers as numbers (empty cells last), text as text; a second click reverses.
_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',function(){
var t=th.closest('table'),b=t.tBodies[0],rows=Array.from(b.rows),asc=!th.classList.contains('asc');
t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});th.classList.add(asc?'asc':'desc');
function key(r){var c=r.cells[i],v=c.getAttribute('data-v');return v===null?c.textContent:v}
rows.sort(function(a,c){var x=key(a),y=key(c),nx=parseFloat(x),ny=parseFloat(y);
if(x===''&&y!=='')return 1;if(y===''&&x!=='')return -1;
var r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));return asc?r:-r});
rows.forEach(function(r){b.appendChild(r)})})});
"""


def page(rows: Sequence[Mapping[str, Any]], about: Mapping[str, Any], plots: Sequence[Path], out: Path) -> str:
    categories = categories_of(rows)
    per_category = [f"{c}_{f}" for c in categories for f in ("detectors", "unique", "paper_unique")]
    shown = [c for c in _SHOWN if any(r.get(c) not in (None, "", {}) for r in rows)]
    split = shown.index("mean_iou") if "mean_iou" in shown else len(shown)
    head_columns = [*shown[:split], *per_category, *shown[split:]]
    text_columns = {"model", "labels", "layer", "module", "map"}
    # Per-category headers on two lines (category, then what is counted) keep the columns narrow.
    head = "".join(f'<th class="{"text" if c in text_columns else "num"}" title="{_e(c)}">'
                   f'{_header(c, categories)}</th>' for c in head_columns)
    body = []
    for row in rows:
        cells = []
        for column in head_columns:
            value = row.get(column)
            shown_value = _cell(column, value)
            if column == "model" and row.get("run"):
                report = Path(str(row["run"])) / "report.html"
                if (out / report).is_file():
                    shown_value = f'<a href="{_e(report.as_posix())}">{shown_value}</a>'
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            sort_value = "" if value is None else value if numeric else None
            data = f' data-v="{_e(sort_value)}"' if sort_value is not None else ""
            css = "text" if column in text_columns else "num"
            cells.append(f'<td class="{css}"{data}>{shown_value}</td>')
        if row.get("status") == FAILED:
            cells.append(f'<td class="error">failed: {_e(row.get("error"))}</td>')
        body.append(f'<tr class="{_e(row.get("status"))}">{"".join(cells)}</tr>')
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _meta(about, rows))
    rules = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in COUNTING_RULES.items())
    figures = "".join(f'<figure><img src="{_e(p.name)}" alt="{_e(PLOTS.get(p.stem, p.stem))}">'
                      f"<figcaption>{_e(PLOTS.get(p.stem, p.stem))}</figcaption></figure>" for p in plots)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        "<title>Network dissection: comparison</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Network dissection: {len({r.get('model') for r in rows})} models compared</h1>",
        f'<dl class="meta">{meta}</dl>',
        f'<ul class="rules">{rules}<li>Columns <b>&lt;category&gt;_…</b> count per category; click a column to '
        "sort. A model links to its own report.</li></ul>",
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
        figures,
        f"<script>{_JS}</script></body></html>",
    ]) + "\n"


def _meta(about: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """The header's lines, in words."""
    dataset = about.get("dataset") or {}
    rule = about.get("threshold_rule") or {}
    jobs = about.get("jobs") or {}
    items: list[tuple[str, Any]] = []
    if dataset:
        items.append(("dataset", f"{dataset.get('format', '?')} at {dataset.get('path', '?')} ({dataset.get('images')} "
                                 f"images; {', '.join(dataset.get('categories') or [])})"))
    if rule:
        params = rule.get("params") or {}
        if rule.get("name") == "quantile":
            text = f"top {params.get('q')} quantile per unit"
        else:
            text = f"{rule.get('name')} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'no parameters'})"
        items.append(("threshold", f"{text} ({about.get('semantics', 'paper')} semantics)"))
    if jobs:
        items.append(("jobs", f"{jobs.get('total')}: {jobs.get('from_store')} read from the store, "
                              f"{jobs.get('failed')} failed ({about.get('executor')} executor)"))
    items.append(("store", about.get("store") or "not used"))
    items.append(("rows", len(rows)))
    items.append(("written", f"{about.get('created', '')} by netdissection {about.get('netdissection', '')}"))
    return items


def _header(column: str, categories: Sequence[str]) -> str:
    for category in categories:
        if column.startswith(f"{category}_"):
            return f"{_e(category)}<br>{_e(column[len(category) + 1:].replace('_', ' '))}"
    return _e(column.replace("_", " "))


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "mean_iou" and isinstance(value, float):
        return f"{value:.3f}"
    if column == "map" and isinstance(value, list | tuple):
        return "×".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return _e(", ".join(f"{k}={v}" for k, v in value.items()))
    if isinstance(value, bool):
        return "store" if value else ""
    return _e(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
