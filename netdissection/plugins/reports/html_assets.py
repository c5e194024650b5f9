"""The inline stylesheet and script of the HTML report: plain CSS and vanilla JS, nothing fetched (offline)."""

from __future__ import annotations

CSS = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --muted: #6b7280; --line: #d9dde3; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       background: var(--bg); color: var(--ink); }
header.page { padding: 18px 24px 8px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 0; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.notice { margin: 10px 24px; padding: 8px 12px; border-left: 4px solid #d97706; background: #fff7e6; }
nav.toolbar { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 6px 16px;
              align-items: center; padding: 8px 24px; background: rgba(244, 245, 247, .96);
              border-bottom: 1px solid var(--line); }
nav.toolbar .group { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
nav.toolbar .name { color: var(--muted); margin-right: 2px; }
button { font: inherit; padding: 2px 10px; border: 1px solid var(--line); border-radius: 12px;
         background: #fff; color: var(--ink); cursor: pointer; }
button:hover { border-color: var(--accent); }
button.active { background: var(--accent); border-color: var(--accent); color: #fff; }
button[data-sort].active::after { content: " \\2193"; }
button[data-sort].active.asc::after { content: " \\2191"; }
.swatch { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 5px; }
section.layer { padding: 14px 24px 24px; }
section.layer > header { display: flex; flex-wrap: wrap; gap: 4px 18px; align-items: baseline; margin-bottom: 8px; }
.headline { font-weight: 600; }
.module { color: var(--muted); font-family: ui-monospace, monospace; font-size: 13px; }
.shown { color: var(--muted); }
table.counts { border-collapse: collapse; margin: 4px 0 12px; font-size: 13px; }
table.counts th, table.counts td { padding: 2px 10px; border-bottom: 1px solid var(--line); text-align: right; }
table.counts th:first-child, table.counts td:first-child { text-align: left; }
table.counts caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 12px; padding-top: 4px; }
.grid { display: flex; flex-direction: column; gap: 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-left: 5px solid var(--cat, #999);
        border-radius: 6px; padding: 6px 10px 8px; }
.card[hidden] { display: none; }
.card .info { display: flex; flex-wrap: wrap; gap: 2px 14px; align-items: baseline; margin-bottom: 5px; }
.card .unit { font-variant-numeric: tabular-nums; color: var(--muted); min-width: 5.5em; }
.card .label { font-weight: 600; font-size: 15px; }
.card .cat { color: var(--cat); }
.card .iou { font-variant-numeric: tabular-nums; }
.card .strip { display: block; max-width: 100%; height: auto; background: #222; border-radius: 3px; }
.card.below { opacity: .55; filter: grayscale(1); }
.card.below .label::after { content: "  (below IoU threshold)"; font-weight: 400; font-size: 12px;
                            color: var(--muted); }
details.plots { margin: 0 0 12px; }
details.plots summary { cursor: pointer; color: var(--accent); }
details.plots figure { display: inline-block; margin: 8px 16px 0 0; vertical-align: top; }
details.plots img { max-width: 100%; background: #fff; border: 1px solid var(--line); }
details.plots figcaption { color: var(--muted); font-size: 12px; }
header.page details.plots { margin-top: 8px; }
footer { padding: 12px 24px 30px; color: var(--muted); font-size: 12px; }
"""

JS = """
(function () {
  "use strict";
  var descByDefault = { unit: false, iou: true, label: false, category: false };
  var state = { key: "iou", desc: true, cat: "", detectorsOnly: false };
  var grids = Array.prototype.slice.call(document.querySelectorAll(".grid"));
  var sortButtons = Array.prototype.slice.call(document.querySelectorAll("button[data-sort]"));
  var filterButtons = Array.prototype.slice.call(document.querySelectorAll("button[data-filter]"));
  var detectorsOnly = document.getElementById("detectors-only");

  function num(card, key) { return parseFloat(card.getAttribute("data-" + key)); }
  function text(card, key) { return card.getAttribute("data-" + key) || ""; }

  // Code-point order, not localeCompare: the same order in every browser and locale (and in Python).
  function order(x, y) { return x < y ? -1 : (x > y ? 1 : 0); }

  function compare(a, b) {
    var r;
    if (state.key === "unit") { r = num(a, "unit") - num(b, "unit"); }
    else if (state.key === "iou") { r = num(a, "iou") - num(b, "iou"); }
    else {
      var field = state.key === "label" ? "label" : "cat";
      r = order(text(a, field), text(b, field));
    }
    if (state.desc) { r = -r; }
    // Ties: the better unit first, then the lower unit number (a stable, predictable order).
    return r || (num(b, "iou") - num(a, "iou")) || (num(a, "unit") - num(b, "unit"));
  }

  function apply() {
    grids.forEach(function (grid) {
      var cards = Array.prototype.slice.call(grid.children);
      cards.sort(compare);
      var shown = 0;
      var fragment = document.createDocumentFragment();
      cards.forEach(function (card) {
        var hide = (state.cat !== "" && text(card, "cat") !== state.cat) ||
                   (state.detectorsOnly && !card.classList.contains("det"));
        card.hidden = hide;
        if (!hide) { shown += 1; }
        fragment.appendChild(card);
      });
      grid.appendChild(fragment);
      var counter = document.getElementById(grid.id + "-shown");
      if (counter) { counter.textContent = shown + " of " + cards.length + " units shown"; }
    });
    sortButtons.forEach(function (b) {
      var on = b.getAttribute("data-sort") === state.key;
      b.classList.toggle("active", on);
      b.classList.toggle("asc", on && !state.desc);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    filterButtons.forEach(function (b) {
      var on = b.getAttribute("data-filter") === state.cat;
      b.classList.toggle("active", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
  }

  sortButtons.forEach(function (b) {
    b.addEventListener("click", function () {
      var key = b.getAttribute("data-sort");
      state.desc = key === state.key ? !state.desc : descByDefault[key];
      state.key = key;
      apply();
    });
  });
  filterButtons.forEach(function (b) {
    b.addEventListener("click", function () { state.cat = b.getAttribute("data-filter"); apply(); });
  });
  if (detectorsOnly) {
    detectorsOnly.addEventListener("change", function () { state.detectorsOnly = detectorsOnly.checked; apply(); });
  }
  apply();
}());
"""
