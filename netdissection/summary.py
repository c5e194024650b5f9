"""The terminal summary printed at the end of a run (and by ``dissect report``).

Per layer: the headline (detectors and concepts by the report rule), the detectors and unique concepts
per category by both counting rules, labelled, and the top units by IoU; then the timings and the files
written. Laid out for an 80–100 column terminal: the two tables of a layer sit side by side when they fit
and stack when they do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .core.reporting import random_weights
from .core.scores import DetectorCounts, UnitScore, count_detectors, unit_scores
from .core.types import DETECTOR_IOU, RunResult, layer_described

if TYPE_CHECKING:  # pragma: no cover
    from .core.bootstrap import LayerBootstrap

REPORT_RULE = f"report rule: one label per unit, IoU ≥ {DETECTOR_IOU}"
PAPER_RULE = f"paper rule: best IoU within the category > {DETECTOR_IOU}"


def print_summary(console: Console, result: RunResult, out_dir: Path, seconds: float | None = None,
                  top: int = 10) -> None:
    """Per layer: detectors and unique concepts per category (both rules), the ``top`` units; then the
    time per pass (for a run that just happened) and where the reports are."""
    notice = random_weights_notice(result.provenance)
    if notice:
        console.print(Text(notice, style="bold yellow"))
    if result.skipped:
        from .core.skipped import skipped_notice

        console.print(Text(skipped_notice(result.skipped, shown=3), style="yellow"), soft_wrap=True)
    rotated = rotation_notice(result.provenance)
    if rotated:
        console.print(Text(rotated, style="bold yellow"))
    for name, layer in result.layers.items():
        rows = unit_scores(layer)
        counts = count_detectors(rows, layer.vocabulary.categories)
        console.print()
        console.print(Text.assemble((f"{name}:", "bold cyan"), " ", headline(counts)))
        if layer_described(layer):
            console.print(Text(layer_described(layer), style="dim"))
        console.print(Columns([category_table(counts, layer.vocabulary.categories), top_units_table(rows, top)],
                              padding=(0, 3)))
        if layer.bootstrap is not None:
            console.print(Text(bootstrap_line(layer.bootstrap)), soft_wrap=True)
    # Which columns count by which rule, one line each (each fits 80 columns).
    console.print(Text(f"detectors, unique: {REPORT_RULE}", style="dim"))
    console.print(Text(f"paper units, paper unique: {PAPER_RULE}", style="dim"))
    if seconds is not None:
        console.print(timing_line(result, seconds))
    head, files = written_text(result.written, out_dir)
    console.print(head, soft_wrap=True)  # never break a path: it is there to be copied
    console.print(files)


def random_weights_notice(provenance: dict) -> str | None:  # type: ignore[type-arg]
    """One line saying that the model was untrained (seeded random weights), or None."""
    seed = random_weights(provenance)
    if seed is None:
        return None
    return (f"random weights, seed {seed['seed']}: not a trained model (pass --weights FILE or --pretrained "
            "to dissect trained weights)")


def rotation_notice(provenance: dict) -> str | None:  # type: ignore[type-arg]
    """One line saying that the units were read in a rotated basis (``--rotate``), or None."""
    rotation = provenance.get("rotation")
    if not rotation:
        return None
    return (f"units in a rotated basis: Q^{rotation['alpha']:g}, Q a random rotation from seed {rotation['seed']} "
            "and each layer's name (--rotate)")


def headline(counts: DetectorCounts) -> str:
    return (f"{counts.detectors}/{counts.units} units are detectors covering {counts.unique_labels} concepts "
            f"(IoU ≥ {DETECTOR_IOU})")


def bootstrap_line(boot: LayerBootstrap) -> str:
    """The bootstrap's intervals of a layer's totals, and its unstable units, in one line."""
    from .core.bootstrap import STABLE

    ci = boot.counts
    unstable = [str(int(u) + 1) for u in boot.unstable.nonzero()[0]]
    shown = ", ".join(unstable[:8]) + (", …" if len(unstable) > 8 else "")
    flagged = (f"{len(unstable)} unit{'s' * (len(unstable) != 1)} ({shown}) keep their detector status in fewer "
               f"than {STABLE:.0%} of resamples") if unstable else "every detector status holds"
    return (f"95% intervals over {boot.resamples} resamples ({boot.blocks} blocks): detectors "
            f"{ci['detectors'][0]}–{ci['detectors'][1]}, unique {ci['unique_labels'][0]}–{ci['unique_labels'][1]}, "
            f"paper unique {ci['paper_unique_labels_total'][0]}–{ci['paper_unique_labels_total'][1]}; {flagged} "
            "(per category and unit: summary.json, tally.csv, report.html)")


def category_table(counts: DetectorCounts, categories: Sequence[str]) -> Table:
    """Per category: detectors and unique concepts by the report rule, units and unique by the paper's."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    table.add_column("category")
    table.add_column("detectors", justify="right")
    table.add_column("unique", justify="right")
    table.add_column("paper\nunits", justify="right", style="dim")
    table.add_column("paper\nunique", justify="right", style="dim")
    for c in categories:
        table.add_row(c, str(counts.detectors_by_category[c]), str(counts.unique_by_category[c]),
                      str(counts.paper_units_by_category[c]), str(counts.paper_unique_by_category[c]))
    table.add_row("all", str(counts.detectors), str(counts.unique_labels), "–", str(counts.paper_unique_total),
                  style="bold", end_section=True)
    return table


def top_units_table(rows: Sequence[UnitScore], top: int) -> Table:
    """The ``top`` units by IoU (rows come sorted by descending score) with their label and category."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    # Two-line headers, like the category table's, so the two tables line up when side by side.
    table.add_column("top\nunit", justify="right")
    table.add_column("\nlabel", max_width=22, overflow="ellipsis", no_wrap=True)
    table.add_column("\ncategory")
    table.add_column("\nIoU", justify="right")
    for row in rows[:top]:
        style = "" if row.score >= DETECTOR_IOU else "dim"
        table.add_row(str(row.unit), row.label, row.category, f"{row.score:.3f}", style=style)
    return table


def timing_line(result: RunResult, seconds: float) -> str:
    """One line (under 80 columns for common runs): total time, then each pass with its rate."""
    s = result.seconds
    if not result.images or "activations" not in s:
        return f"{seconds:.1f} s in all"
    parts = [f"{seconds:.1f} s for {result.images} images"]
    runtime = (result.provenance.get("backend_details") or {}).get("runtime")
    for name, key in (("activations", "activations"), ("IoU", "iou")):
        if key in s:
            on = f" on {runtime}" if key == "activations" and runtime not in (None, "torch") else ""
            parts.append(f"{name} {s[key]:.1f} s ({result.images / max(s[key], 1e-9):.0f}/s{on})")
    if s.get("thresholds", 0) >= 0.05:  # usually a few ms: not worth a column of the line
        parts.append(f"thresholds {s['thresholds']:.1f} s")
    if "explain" in s:  # --explain: the explainer's reads and search
        parts.append(f"explain {s['explain']:.1f} s")
    return " · ".join(parts)


def group_written(paths: Iterable[str]) -> dict[str, list[str]]:
    """Written files by folder ('' for the top), one entry per stem with its suffixes joined
    (``unique_detectors.svg|png``), in the order they were written."""
    folders: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        p = PurePosixPath(path.replace("\\", "/"))
        folder = "" if str(p.parent) == "." else str(p.parent)
        stems = folders.setdefault(folder, {})
        stems.setdefault(p.stem if p.suffix else p.name, []).append(p.suffix.lstrip("."))
    return {folder: [f"{stem}.{'|'.join(s)}" if s != [""] else stem for stem, s in stems.items()]
            for folder, stems in folders.items()}


def written_text(written: Sequence[str], out_dir: Path) -> tuple[Text, Table]:
    """Where the results are: a line with the folder and the page to open, and the files by folder."""
    head = Text.assemble(("results: ", "bold"), f"{out_dir}/")
    if "report.html" in written:
        head.append("   open ", style="bold")
        head.append(str(out_dir / "report.html"), style="underline")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column()
    groups = group_written(written)
    for folder in sorted(groups, key=lambda f: f != ""):  # the top folder first
        grid.add_row(f"  {folder}/" if folder else "  ./", "  ".join(groups[folder]))
    return head, grid
