"""The ``markdown`` report writer: ``report.md``, per layer the detector counts and the top units."""

from __future__ import annotations

from pathlib import Path

from netdissection import RunResult
from netdissection.core.files import atomic_write_text
from netdissection.core.scores import count_detectors, unit_scores
from netdissection.core.types import DETECTOR_IOU

REPORT = "report.md"


class MarkdownReport:
    """``factory(top_k=None)``: ``top_k`` units per layer in the table (``dissect report --top-k K``)."""

    def __init__(self, top_k: int | None = None) -> None:
        self.top = top_k or 10

    def write(self, result: RunResult, out_dir: Path) -> list[Path]:
        return [atomic_write_text(out_dir / REPORT, render(result, self.top))]


def render(result: RunResult, top: int) -> str:
    provenance = result.provenance
    rule = provenance.get("threshold_rule") or {}
    params = ", ".join(f"{k}={v}" for k, v in (rule.get("params") or {}).items())
    lines = [f"# Network dissection of {provenance.get('model', 'a model')}", "",
             f"- backend: {provenance.get('backend', '?')}",
             f"- dataset: {(provenance.get('dataset') or {}).get('format', '?')}, {result.images} images",
             f"- threshold rule: {rule.get('name', '?')} ({params or 'no parameters'})", ""]
    for name, layer in result.layers.items():
        rows = unit_scores(layer)
        counts = count_detectors(rows, layer.vocabulary.categories)
        lines += [f"## {name}", "",
                  f"{counts.detectors} of {counts.units} units are detectors (IoU ≥ {DETECTOR_IOU}) covering "
                  f"{counts.unique_labels} concepts.", "",
                  "| unit | label | category | IoU |", "|---:|---|---|---:|"]
        lines += [f"| {row.unit} | {row.label} | {row.category} | {row.score:.4f} |" for row in rows[:top]]
        lines.append("")
    return "\n".join(lines)
