"""``dissect compare`` and ``dissect cache``, added to the CLI as a built-in plugin.

Exit status of ``dissect compare``: 0 when every job finished, 1 when some failed (their rows say why; the
others are in the table), 2 for bad input (nothing ran).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.cache import format_size, parse_size
from ..core.hookspecs import CommandContext, hookimpl
from ..plugins.reports.plots import COPY_FORMATS

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

    from ..core.execution import JobOutcome
    from ..core.jobkey import Job
    from .specs import CheckpointSeries

log = logging.getLogger(__name__)

#: Exit status of a comparison in which some jobs failed.
SOME_FAILED = 1


@hookimpl
def dissect_register_commands(cli: click.Group, context: CommandContext) -> None:
    for name, make in (("compare", lambda: compare_command(context)), ("cache", lambda: cache_group)):
        if name not in cli.commands:  # a plugin registered earlier replaced it: keep theirs
            cli.add_command(make())


class CompareProgress:
    """One bar over the jobs, and beneath it the current job's passes (replaced at each job)."""

    def __init__(self, console: Console, total: int | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=False)
        self._jobs: Any = None
        self._passes: list[Any] = []
        self._current: Any = None

    def __enter__(self) -> CompareProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._clear()
        self._progress.stop()

    # JobEvents
    def job_started(self, index: int, job: Job, total: int) -> CompareProgress:
        if self._jobs is None:
            self._jobs = self._progress.add_task("jobs", total=total)
        self._clear()
        self._progress.update(self._jobs, description=f"jobs: {_short(job.display, 22)}")
        return self

    def job_finished(self, outcome: JobOutcome) -> None:
        self._progress.advance(self._jobs)
        if outcome.status == "failed":
            self._progress.console.print(f"[red]{outcome.job.display} failed:[/] {outcome.error}", highlight=False,
                                         soft_wrap=True)

    # Progress of the current job's passes (core.scheduler.Progress)
    def start(self, name: str, total: int) -> None:
        self._current = self._progress.add_task(f"  {name}", total=total)
        self._passes.append(self._current)

    def advance(self, images: int) -> None:
        self._progress.advance(self._current, images)

    def finish(self) -> None:
        self._progress.refresh()

    def _clear(self) -> None:
        for task in self._passes:
            self._progress.remove_task(task)
        self._passes.clear()


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _dissect_options(function: Any, context: CommandContext) -> Any:
    """The options of ``dissect MODEL`` that apply to every model of a comparison (the threshold and input
    options are the very ones ``dissect MODEL`` has, from the command context)."""
    options = [
        click.option("--backend", help="Backend for every model (default: detected per model)."),
        click.option("--pretrained", is_flag=True, help="The frameworks' own pretrained weights (needs a network)."),
        click.option("--dataset", help="Concept dataset (default: the built-in generated set)."),
        click.option("--dataset-format", help="Dataset format, when it cannot be detected."),
        click.option("--categories", multiple=True, help="Comma-separated categories to use (default: all)."),
        context.threshold_options,
        click.option("--compat", type=click.Choice(["paper", "lite"]), default="paper", show_default=True),
        click.option("--batch-size", type=int, default=32, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--workers", type=int, help="Data loading processes (default: cores - 1, at most 4)."),
        click.option("--top-k", type=int, default=10, show_default=True, help="Top images kept per unit."),
        click.option("--report", "reporters", multiple=True, help="Report writers per run (default: all defaults)."),
        click.option("--plot-format", "plot_formats", multiple=True, type=click.Choice(COPY_FORMATS),
                     help="Each run draws its plots (left out by default), also as PNG or PDF (repeatable)."),
        click.option("--skip-bad", is_flag=True, help="Skip unreadable images or labels."),
        click.option("--cache", type=click.Choice(["auto", "disk", "recompute"]), default="auto", show_default=True,
                     help="Where each run's later reads get the maps: a disk cache, or another forward pass."),
        click.option("--cache-budget", metavar="SIZE", help="Most disk an activation cache may take, e.g. 20G."),
        context.input_options,
        context.runtime_option,
        context.bootstrap_options,
        context.explain_options,
        click.option("--image-column", help="Dataset image column (HuggingFace datasets)."),
        click.option("--mask-column", "mask_columns", multiple=True, help="Dataset mask column (repeatable)."),
        click.option("--split", help="Dataset split (HuggingFace datasets)."),
        click.option("--concepts", type=click.Path(dir_okay=False), help="Concepts file (HuggingFace datasets)."),
        context.strict_plugins_option,
        context.verbose_option,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def compare_command(context: CommandContext) -> click.Command:
    """The ``compare`` command, with the run options the command context provides."""
    return click.command("compare", cls=_OrderedCommand)(
        _compare_options(_dissect_options(click.pass_obj(run_compare), context)))


#: Where ``_OrderedCommand`` keeps the names of the options as they came, one entry per occurrence.
OPTION_ORDER = "netdissection.option_order"


class _OrderedCommand(click.Command):
    """Remembers the order of the options as typed (click keeps each option's values, not how options
    interleave), so that a ``--label`` can belong to the ``--checkpoints`` before it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            ctx.meta[OPTION_ORDER] = [param.name for param in order]
        except click.UsageError:
            pass  # the real parse below reports it
        return super().parse_args(ctx, args)


def series_of(checkpoints: Sequence[str], labels: Sequence[str], order: Sequence[str | None]) -> tuple[
        list[CheckpointSeries], list[str]]:
    """Each ``--checkpoints`` as a series with the ``--label``s typed after it (before the next one), and the
    ``--label``s typed before the first (or all of them, without checkpoints), which tag every row."""
    from .specs import CheckpointSeries, parse_label

    if not checkpoints:
        return [], list(labels)
    common: list[str] = []
    own: list[list[str]] = [[] for _ in checkpoints]
    seen_checkpoints = seen_labels = 0
    for name in order:
        if name == "checkpoints":
            seen_checkpoints += 1
        elif name == "labels" and seen_labels < len(labels):
            (own[seen_checkpoints - 1] if seen_checkpoints else common).append(labels[seen_labels])
            seen_labels += 1
    common += labels[seen_labels:]  # not seen in the order (never, when click parsed them): every row
    series = [CheckpointSeries(tuple(p.strip() for p in value.split(",") if p.strip()),
                               dict(parse_label(text) for text in texts))
              for value, texts in zip(checkpoints, own, strict=True)]
    return series, common


def _compare_options(function: Any) -> Any:
    """The options of a comparison itself: which models, checkpoints and layers, where results go, how jobs run."""
    for option in reversed([
        click.argument("models", nargs=-1),
        click.option("--models", "patterns", multiple=True,
                     help="Comma-separated names or patterns: 'timm:convnext_*,timm:vit_*_patch16_224', "
                          "'models/*.onnx'."),
        click.option("--exclude", multiple=True, help="Comma-separated patterns of models to leave out ('*in22k*')."),
        click.option("--models-file", type=click.Path(dir_okay=False),
                     help="One 'MODEL [--weights FILE] [--layer L]... [--label K=V]... [--checkpoints GLOBS]' per "
                          "line; # comments."),
        click.option("--checkpoints", multiple=True,
                     help="Checkpoints of the one model, as globs ('ckpt/epoch_*.pt'); 'random' adds the untrained "
                          "model. Repeat for several series (training settings), each followed by its --label."),
        click.option("--x-from", metavar="REGEX",
                     help="Read each checkpoint's x from its name with REGEX (first group)."),
        click.option("--layer", "layers", multiple=True,
                     help="Layer (repeatable) where the model has it; stage:-1 = last stage, stage:* = every stage."),
        click.option("--label", "labels", multiple=True,
                     help="KEY=VALUE (repeatable): after a --checkpoints, the group of that series in the plots; "
                          "otherwise shown with every row."),
        click.option("--rotate", "rotate", multiple=True, metavar="ALPHAS",
                     help="Dissect every model once per α (comma-separated, in [0, 1]) with its units in the rotated "
                          "basis Q^α: 0,0.2,0.4,0.6,0.8,1 draws detectors against α."),
        click.option("--rotate-seed", type=int, default=0, show_default=True,
                     help="Seed of the random rotation Q (each layer's Q also depends on its name)."),
        click.option("--add-tally", "tallies", multiple=True, metavar="NAME=PATH",
                     help="A published NetDissect tally.csv as a row (repeatable)."),
        click.option("--out", default="comparison", show_default=True, type=click.Path(file_okay=False),
                     help="Output folder: compare.csv, compare.json, index.html, plots, runs/."),
        click.option("--store", "store_dir", type=click.Path(file_okay=False),
                     help="Results store folder (default: the cache folder; $NETDISSECTION_CACHE moves it)."),
        click.option("--no-store", is_flag=True, help="Compute every job, keep nothing in the store."),
        click.option("--executor", default="local", show_default=True, help="How jobs run (see: dissect plugins)."),
        click.option("--address", help="Cluster address (executors that run on a cluster)."),
        click.option("--shards", type=int, help="Dataset shards per model (executors that shard)."),
    ]):
        function = option(function)
    return function


def run_compare(context: CommandContext, models: tuple[str, ...], patterns: tuple[str, ...],
                exclude: tuple[str, ...], models_file: str | None, checkpoints: tuple[str, ...], x_from: str | None,
                layers: tuple[str, ...], labels: tuple[str, ...], rotate: tuple[str, ...], rotate_seed: int,
                tallies: tuple[str, ...], out: str, store_dir: str | None, no_store: bool, executor: str,
                address: str | None, shards: int | None, **options: Any) -> None:
    """Dissect many models (or checkpoints, or layers) and compare them in one table.

    \b
      dissect compare resnet18 resnet50 convnext_tiny model.onnx
      dissect compare --models 'timm:convnext_*' --exclude '*in22k*' --layer stage:-1
      dissect compare resnet18 --checkpoints 'ckpt/epoch_*.pt,random'
      dissect compare resnet18 --checkpoints 'a/epoch_*.pt' --label dropout=0 \\
                               --checkpoints 'b/epoch_*.pt' --label dropout=0.5
      dissect compare resnet18 --layer 'stage:*'
      dissect compare resnet18 --rotate 0,0.2,0.4,0.6,0.8,1

    Finished jobs are read from the results store, not computed again. Exit status: 0 when every job
    finished, 1 when some failed (see their rows), 2 for bad input.
    """
    from ..core.errors import DissectionError
    from .api import compare

    context.setup_logging(options.pop("verbose") + 1)
    if no_store and store_dir:
        raise DissectionError("--store and --no-store contradict each other; pass one")
    backend_options = context.backend_options(options.pop("input_size"), options.pop("mean"), options.pop("std"),
                                              options.pop("bgr"), options.pop("runtime"))
    explained = context.explain_arguments(options.pop("explain"), options.pop("explain_params"),
                                          options.pop("formula_length"), options.pop("beam"), options.pop("units"))
    dataset_options = {"image_column": options.pop("image_column"), "split": options.pop("split"),
                       "concepts": options.pop("concepts"), "mask_columns": list(options.pop("mask_columns")) or None}
    series, common = series_of(checkpoints, labels, click.get_current_context().meta.get(OPTION_ORDER, []))
    alphas = [_alpha(text) for text in context.split(rotate)] if rotate else None
    started = time.perf_counter()
    out_console, err_console = context.out, context.err
    with CompareProgress(err_console) as progress:
        table = compare([*models, *context.split(patterns)], models_file=models_file, exclude=context.split(exclude),
                        checkpoints=series, x_from=x_from, layers=list(layers), labels=common,
                        rotate=alphas, rotate_seed=rotate_seed,
                        add_tallies=list(tallies), out=out, store=False if no_store else (store_dir or True),
                        executor=executor, executor_options={"address": address, "shards": shards},
                        categories=context.split(options.pop("categories")) or None,
                        reporters=context.split(options.pop("reporters")) or None,
                        plot_formats=list(options.pop("plot_formats")), backend_options=backend_options,
                        dataset_options=dataset_options, events=progress, host=context.host,
                        strict_plugins=options.pop("strict_plugins") or None, **explained, **options)
    out_console.print(comparison_table(table, out_console.width))
    computed = sum(not o.cached and o.status == "ok" for o in table.outcomes)
    cached = sum(o.cached for o in table.outcomes)
    out_console.print(f"{len(table.outcomes)} jobs in {time.perf_counter() - started:.1f} s: {computed} computed, "
                      f"{cached} from the store, {len(table.outcomes) - computed - cached} failed", highlight=False)
    out_console.print(f"[bold]results:[/] {out}/   open [underline]{Path(out) / 'index.html'}[/]", highlight=False,
                      soft_wrap=True)
    if table.failed:
        err_console.print(f"[red]{len(table.failed)} of {len(table.outcomes)} jobs failed[/] (exit status "
                          f"{SOME_FAILED}); their rows in compare.csv say why", highlight=False)
        sys.exit(SOME_FAILED)


def _alpha(text: str) -> float:
    from ..core.errors import DissectionError

    try:
        return float(text)
    except ValueError:
        raise DissectionError(f"--rotate takes numbers α between 0 and 1, comma-separated, not {text!r}") from None


def comparison_table(rows: Sequence[dict[str, Any]], width: int = 80) -> Table:
    """The rows in the terminal: counts by both rules and, when ``width`` allows, per category the paper
    rule's unique concepts."""
    from rich import box
    from rich.table import Table

    from .rows import categories_of

    with_x = any(r.get("x") is not None for r in rows)
    with_rotate = any(r.get("rotate") is not None for r in rows)
    categories = categories_of(rows)
    per_category = width >= 104 + 6 * len(categories)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), caption="det, uniq: one label per unit, IoU ≥ 0.04 (report "
                  "rule) · paper: per category, best IoU within it > 0.04 (paper rule)", caption_justify="left")
    longest = max((len(str(r.get("model"))) for r in rows), default=5)
    table.add_column("model", min_width=min(longest, 20), overflow="fold")
    if with_x:
        table.add_column("x", justify="right", no_wrap=True)
    if with_rotate:
        table.add_column("α", justify="right", no_wrap=True)
    table.add_column("layer → module", overflow="fold")
    table.add_column("map", justify="right", no_wrap=True)
    for name in ("det", "uniq", "paper\nuniq"):
        table.add_column(name, justify="right", no_wrap=True)
    if per_category:
        for c in categories:
            table.add_column(f"paper\n{c[:6]}", justify="right", style="dim", no_wrap=True)
    table.add_column("mean\nIoU", justify="right", no_wrap=True)
    wide = width >= 100  # the time and where the row came from: only when there is room
    if wide:
        table.add_column("s", justify="right", no_wrap=True)
        table.add_column("", style="dim", no_wrap=True)
    for row in rows:
        lead = [str(row["model"]), *([_text(row.get("x"))] if with_x else []),
                *([_text(row.get("rotate"))] if with_rotate else [])]
        if row.get("status") == "failed":
            table.add_row(*lead, f"failed: {row.get('error')}", style="red")
            continue
        layer = row.get("layer") or ""
        if row.get("module") and row["module"] != layer:
            layer = f"{layer} → {row['module']}"
        shape = row.get("map")
        table.add_row(*lead, layer, "×".join(str(v) for v in shape) if shape else "", _text(row.get("detectors")),
                      _text(row.get("unique")), _text(row.get("paper_unique")),
                      *([_text(row.get(f"{c}_paper_unique")) for c in categories] if per_category else []),
                      f"{row['mean_iou']:.3f}" if isinstance(row.get("mean_iou"), float) else "",
                      *([f"{row['seconds']:.1f}" if isinstance(row.get("seconds"), float | int) else "",
                         "store" if row.get("cached") else ("tally" if row.get("status") == "tally" else "")]
                        if wide else []))
    return table


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# ---- dissect cache -------------------------------------------------------------------------------------------

@click.group("cache")
def cache_group() -> None:
    """Show and prune the results store (finished dissections by job key)."""


_store_option = click.option("--store", "store_dir", type=click.Path(file_okay=False),
                             help="Results store folder (default: the cache folder's store).")


@cache_group.command("ls")
@_store_option
@click.pass_obj
def cache_ls(context: CommandContext, store_dir: str | None) -> None:
    """List the finished jobs in the store: key, model, layers, dataset, size, when."""
    from rich import box
    from rich.table import Table

    out_console = context.out
    from ..core.store import ResultsStore

    store = ResultsStore(store_dir)
    entries = store.listing()
    total = format_size(sum(e.bytes for e in entries))
    table = Table(title=f"results store {store.root} ({len(entries)} jobs, {total})",
                  box=box.SIMPLE_HEAD)
    wide = out_console.width >= 120
    table.add_column("key", no_wrap=True)  # a prefix as git shows commits (rm takes prefixes); whole when wide
    table.add_column("model", overflow="fold")
    table.add_column("layers", overflow="fold")
    if wide:
        table.add_column("dataset", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for entry in entries:
        record = entry.record or {}
        job = record.get("job") or {}
        model = str(job.get("name") or job.get("model") or "?")
        if job.get("weights") and "@" not in model:
            model += f"@{Path(job['weights']).name}"
        dataset = [str(job.get("dataset") or "built-in")] if wide else []
        layers = ", ".join(job.get("layers") or []) or "(default)"
        created = str(record.get("created", "unreadable record"))[:16].replace("T", " ")
        table.add_row(entry.key if wide else entry.key[:12], model, layers, *dataset, format_size(entry.bytes), created)
    out_console.print(table)


@cache_group.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "remove_all", is_flag=True, help="Remove every finished job.")
@_store_option
@click.pass_obj
def cache_rm(context: CommandContext, keys: tuple[str, ...], remove_all: bool, store_dir: str | None) -> None:
    """Remove finished jobs by key (or a unique prefix of one, 6 characters or more)."""
    out_console = context.out
    from ..core.errors import DissectionError, UnknownNameError
    from ..core.store import ResultsStore

    store = ResultsStore(store_dir)
    known = [e.key for e in store.listing()]
    if remove_all:
        chosen = known
    elif not keys:
        raise DissectionError("name the keys to remove (see: dissect cache ls), or pass --all")
    else:
        chosen = []
        for key in keys:
            matches = [k for k in known if k.startswith(key.lower())] if len(key) >= 6 else []
            if len(matches) != 1:
                if len(matches) > 1:
                    raise DissectionError(f"{key!r} starts {len(matches)} keys; give more of it")
                raise UnknownNameError("store key", key, known, hint="see: dissect cache ls")
            chosen.append(matches[0])
    for key in chosen:
        store.remove(key)
    out_console.print(f"removed {len(chosen)} jobs from {store.root}", highlight=False)


@cache_group.command("gc")
@click.option("--max-size", help="Evict the least recently used jobs until the store fits (e.g. 20G, 500M).")
@click.option("--older-than", type=float, metavar="DAYS", help="Remove jobs not used for DAYS days.")
@_store_option
@click.pass_obj
def cache_gc(context: CommandContext, max_size: str | None, older_than: float | None, store_dir: str | None) -> None:
    """Remove what killed jobs left behind and corrupt entries; optionally prune by age or size."""
    out_console = context.out
    from ..core.store import ResultsStore

    store = ResultsStore(store_dir)
    report = store.gc(max_bytes=parse_size(max_size, "--max-size"), older_than_days=older_than)
    out_console.print(f"{store.root}: removed {len(report.staging)} unfinished jobs' folders, {len(report.corrupt)} "
                      f"corrupt and {len(report.evicted)} pruned jobs; {format_size(report.freed)} freed",
                      highlight=False)
