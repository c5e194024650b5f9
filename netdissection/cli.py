"""The ``dissect`` command: ``dissect MODEL [options]`` plus subcommands (layers, plugins, backends, ...).

Plugins add subcommands through the ``dissect_register_commands(cli)`` hook.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .core import malloc
from .core.errors import DissectionError
from .core.runtimes import RUNTIME_HELP, RUNTIMES
from .core.version import __version__
from .plugins.reports.plots import COPY_FORMATS

log = logging.getLogger("netdissection")
err_console = Console(stderr=True)
out_console = Console()


class _RunByDefault(click.Group):
    """``dissect MODEL ...`` means ``dissect run MODEL ...`` unless MODEL names a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} images/s" if speed else "   ... images/s", style="cyan")


class RichProgress:
    """The passes' progress as rich bars on stderr (images done, images/s, ETA), one bar per pass.

    One live display serves the whole run, so finished bars stay on screen as they were. It starts with
    the first pass: a run that stops before (a wrong name, a plugin failure) prints only its message.
    """

    def __init__(self, console: Console) -> None:
        self._progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                  _Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=console, transient=False)
        self._task: Any = None
        self._started = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def start(self, name: str, total: int) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        self._task = self._progress.add_task(name, total=total)

    def advance(self, images: int) -> None:
        self._progress.advance(self._task, images)

    def finish(self) -> None:
        self._progress.refresh()


def _numbers(value: str, count: tuple[int, ...], kind: type, what: str) -> tuple:  # type: ignore[type-arg]
    try:
        parts = tuple(kind(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        parts = ()
    if len(parts) not in count:
        raise click.BadParameter(f"{value!r} is not {what}")
    return parts


def _size(value: str) -> tuple[int, int]:
    parts = _numbers(value, (1, 2), int, "a size like 224 or 224,224")
    return (parts[0], parts[0]) if len(parts) == 1 else parts  # type: ignore[return-value]


def _triple(value: str) -> tuple[float, float, float]:
    return _numbers(value, (3,), float, "three numbers like 0.485,0.456,0.406")  # type: ignore[return-value]


def _split(values: Sequence[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _number(value: str) -> Any:
    """A --threshold-param value: an int or a float when it reads as one, else the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _params(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        params[key.strip()] = _number(value.strip())
    return params


class _OneLineWarning(logging.Handler):
    """Plugin failures as one line each on stderr (never wrapped, so that each failure stays one line)."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(Text(f"warning: {record.getMessage()}", style="yellow"), soft_wrap=True)


def _setup_logging(verbose: int) -> None:
    from .registry.failures import failure_log

    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    # Other libraries log one step less than this package: our debug lines without matplotlib's font
    # matching or PIL's chunk reads, which one more -v adds.
    logging.basicConfig(level=min(level + 10, logging.WARNING), format="%(message)s", handlers=[handler],
                        force=True)
    logging.getLogger(__package__).setLevel(level)
    failure_log.handlers[:] = [_OneLineWarning()]
    failure_log.propagate = False


def _verbose_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-v", "--verbose", count=True, help="More log output; repeat for more.")(command)


def _apply(options: Sequence[Callable[..., Any]], command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option(command)
    return command


def _threshold_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--threshold``, ``--threshold-param KEY=VALUE`` (as the ``threshold_params`` dict) and ``--quantile``."""
    return _apply([
        click.option("--threshold", help="Threshold rule (default: quantile, the paper's; see: dissect plugins)."),
        click.option("--threshold-param", "threshold_params", multiple=True, metavar="KEY=VALUE", callback=_params,
                     help="A parameter of the threshold rule (repeatable; numbers are read as numbers)."),
        click.option("--quantile", "quantile", type=float,
                     help="The quantile rule's q (default 0.005): each unit's threshold is its (1 - q) quantile."),
    ], command)


def _input_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--input-size``, ``--mean``, ``--std``, ``--bgr``: how images are fed to the model."""
    return _apply([
        click.option("--input-size", type=_size, metavar="H,W",
                     help="Model input size H,W or S (models with a fixed input)."),
        click.option("--mean", type=_triple, metavar="R,G,B", help="Input normalisation mean (default: the model's)."),
        click.option("--std", type=_triple, metavar="R,G,B", help="Input normalisation std (default: the model's)."),
        click.option("--bgr", is_flag=True, help="The model takes BGR channel order."),
    ], command)


def _runtime_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--runtime", type=click.Choice(RUNTIMES), help=RUNTIME_HELP)(command)


def _bootstrap_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--bootstrap B`` and ``--bootstrap-seed S``: intervals from resampling the images (no model run again)."""
    return _apply([
        click.option("--bootstrap", type=int, default=0, show_default=True, metavar="B",
                     help="Resample the images B times (200 is customary) for 95% intervals of each unit's IoU and "
                          "of the detector counts, and the stability of each label; 0: none."),
        click.option("--bootstrap-seed", type=int, default=0, show_default=True, metavar="S",
                     help="Seed of the bootstrap: which images share a block, and the resamples."),
    ], command)


def _explain_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--explain NAME``, ``--explain-param KEY=VALUE``, ``--formula-length``, ``--beam`` and ``--units``."""
    return _apply([
        click.option("--explain", metavar="NAME", help="Also label units with an explainer: compositional, "
                     "formulas of concepts with AND, OR, AND NOT (see: dissect plugins)."),
        click.option("--explain-param", "explain_params", multiple=True, metavar="KEY=VALUE", callback=_params,
                     help="A parameter of the explainer (repeatable), e.g. formula='red-c AND ball' to score one "
                     "formula."),
        click.option("--formula-length", type=int, help="compositional: the most concepts in a formula (default 3; "
                     "each one past the first reads the dataset once more)."),
        click.option("--beam", type=int, help="compositional: formulas kept per unit at each step (default 5)."),
        click.option("--units", metavar="1,5,9", help="Explain only these units (1-based as in tally.csv; ranges "
                     "like 1-8 too). Default: every unit."),
    ], command)


def _explain_params(params: dict[str, Any], formula_length: int | None, beam: int | None) -> dict[str, Any]:
    """The explainer's parameters: ``--explain-param`` and the named options, which must not disagree."""
    params = dict(params)
    for key, value in (("formula_length", formula_length), ("beam", beam)):
        if value is None:
            continue
        if key in params and params[key] != value:
            raise DissectionError(f"--{key.replace('_', '-')} {value} and --explain-param {key}={params[key]} "
                                  "disagree; give one")
        params[key] = value
    return params


def _backend_options(input_size: tuple[int, int] | None, mean: tuple[float, float, float] | None,
                     std: tuple[float, float, float] | None, bgr: bool, runtime: str | None = None) -> dict[str, Any]:
    """What ``_input_options`` (and ``--runtime``) gave, as ``dissect(backend_options=...)``: only the options
    the user set, so that a run without them keeps the job key it had."""
    options: dict[str, Any] = {k: v for k, v in dict(input_size=input_size, mean=mean, std=std,
                                                     runtime=runtime).items() if v is not None}
    if bgr:
        options["bgr"] = True
    return options


def _plot_format_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--plot-format", "plot_formats", multiple=True, type=click.Choice(COPY_FORMATS),
                        help="Also write each plot as PNG or PDF (repeatable); SVG is always written.")(command)


def _strict_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--strict-plugins", is_flag=True,
                        help="Any plugin failure is an error (exit status 2); also NETDISSECTION_STRICT_PLUGINS=1.")(
        command)


@dataclass
class CliContext:
    """The context of every ``dissect`` command (``core.hookspecs.CommandContext``): plugin commands get it
    from ``dissect_register_commands`` and, while they run, as the click context's ``obj``."""

    host: Any
    out: Console
    err: Console

    def setup_logging(self, verbose: int) -> None:
        _setup_logging(verbose)

    def split(self, values: Sequence[str]) -> list[str]:
        return _split(values)

    def verbose_option(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _verbose_option(command)

    def strict_plugins_option(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _strict_option(command)

    def threshold_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _threshold_options(command)

    def input_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _input_options(command)

    def bootstrap_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _bootstrap_options(command)

    def explain_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _explain_options(command)

    def explain_arguments(self, explain: str | None, explain_params: dict[str, Any], formula_length: int | None,
                          beam: int | None, units: str | None) -> dict[str, Any]:
        from .core.explain import parse_units

        return {"explain": explain, "explain_params": _explain_params(explain_params, formula_length, beam),
                "explain_units": parse_units(units)}

    def runtime_option(self, command: Callable[..., Any]) -> Callable[..., Any]:
        return _runtime_option(command)

    def backend_options(self, input_size: tuple[int, int] | None, mean: tuple[float, float, float] | None,
                        std: tuple[float, float, float] | None, bgr: bool,
                        runtime: str | None = None) -> dict[str, Any]:
        return _backend_options(input_size, mean, std, bgr, runtime)

    def print_summary(self, result: Any, out_dir: Any, seconds: float | None = None) -> None:
        from .summary import print_summary

        print_summary(self.out, result, Path(out_dir), seconds)


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netdissection")
def cli() -> None:
    """Network Dissection: label the units of a vision network with human concepts.

    \b
      dissect MODEL [options]      dissect a model (same as: dissect run MODEL)
      dissect compare MODEL...     dissect many models (checkpoints, layers) into one table
      dissect cache ls|rm|gc       the results store of finished dissections
      dissect layers MODEL         list the layers of a model
      dissect report RESULTS_DIR   rebuild the reports of a finished run
      dissect data ...             download Broden; inspect, validate, convert datasets
      dissect backends             list backends and what they accept
      dissect plugins              list installed plugins, what they provide, every error (--json)
    """


@cli.command("run")
@click.argument("model")
@click.option("--backend", help="Backend that loads MODEL (default: detected; see `dissect backends`).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict or checkpoint file.")
@click.option("--pretrained", is_flag=True, help="Use the framework's own pretrained weights (needs a network).")
@click.option("--dataset", help="Concept dataset folder (Broden format, ...). Default: a built-in generated set.")
@click.option("--dataset-format", help="Dataset format, when it cannot be detected.")
@click.option("--layer", "layers", multiple=True, help="Layer to dissect (repeatable). Default: the last "
              "layer with a spatial map.")
@click.option("--categories", multiple=True, help="Comma-separated categories to use (default: all).")
@_threshold_options
@_explain_options
@click.option("--compat", type=click.Choice(["paper", "lite"]), default="paper", show_default=True,
              help="'lite' reproduces NetDissect-Lite's numbers.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: dissection/MODEL).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--workers", type=int, help="Data loading processes (default: cores - 1, at most 4).")
@click.option("--top-k", type=int, default=10, show_default=True, help="Top images kept per unit.")
@click.option("--report", "reporters", multiple=True,
              help="Report writers to run: NAME or NAME,NAME (repeatable; default: every default writer).")
@_plot_format_option
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images or labels instead of stopping.")
@click.option("--cache", type=click.Choice(["auto", "disk", "recompute"]), default="auto", show_default=True,
              help="Where the reads after the first pass get the maps: a disk cache, or another forward pass; "
              "auto: the disk when the cache fits the budget and the free space.")
@click.option("--cache-budget", metavar="SIZE", help="Most disk the activation cache may take, e.g. 500M, 20G.")
@_bootstrap_options
@_input_options
@_runtime_option
@click.option("--image-column", help="Dataset image column (HuggingFace datasets).")
@click.option("--mask-column", "mask_columns", multiple=True, help="Dataset mask column (repeatable).")
@click.option("--split", help="Dataset split (HuggingFace datasets).")
@click.option("--concepts", type=click.Path(dir_okay=False),
              help="Concepts file naming label ids: id,name,category CSV or id2label JSON (HuggingFace datasets).")
@click.option("--store", "store_dir", type=click.Path(file_okay=False),
              help="Results store folder (default: the cache folder; $NETDISSECTION_CACHE moves it).")
@click.option("--no-store", is_flag=True, help="Compute even if the results store has this run; store nothing.")
@click.option("--rotate", "rotate", type=float, metavar="ALPHA",
              help="Dissect the units in a rotated basis Q^ALPHA (0: none, 1: a random rotation Q).")
@click.option("--rotate-seed", type=int, default=0, show_default=True,
              help="Seed of the random rotation Q (each layer's Q also depends on its name).")
@_strict_option
@_verbose_option
@click.pass_obj
def run_command(context: CliContext, model: str, backend: str | None, weights: str | None, pretrained: bool,
                dataset: str | None, dataset_format: str | None, layers: tuple[str, ...],
                categories: tuple[str, ...], threshold: str | None, threshold_params: dict[str, Any],
                quantile: float | None, explain: str | None, explain_params: dict[str, Any],
                formula_length: int | None, beam: int | None, units: str | None,
                compat: str, out: str | None, batch_size: int, device: str, workers: int | None,
                top_k: int, reporters: tuple[str, ...], plot_formats: tuple[str, ...], skip_bad: bool,
                cache: str, cache_budget: str | None, bootstrap: int, bootstrap_seed: int,
                input_size: tuple[int, int] | None, mean: tuple[float, float, float] | None,
                std: tuple[float, float, float] | None, bgr: bool, runtime: str | None, image_column: str | None,
                mask_columns: tuple[str, ...], split: str | None, concepts: str | None, store_dir: str | None,
                no_store: bool, rotate: float | None, rotate_seed: int, strict_plugins: bool, verbose: int) -> None:
    """Dissect MODEL: a model name (resnet18, ...) or a model file.

    A run already in the results store is read from it (no model runs) and its results written to --out.
    """
    from .api import announce_load_failures, check_run
    from .compare.execution import dissect_stored
    from .core.jobkey import Job
    from .core.locks import folder_lock
    from .core.rotation import check_rotation
    from .core.store import ResultsStore
    from .registry.failures import strict_plugins as strict_plugins_flag

    context.setup_logging(verbose + 1)
    if no_store and store_dir:
        raise DissectionError("--store and --no-store contradict each other; pass one")
    writers = tuple(_split(reporters)) or None
    explained = context.explain_arguments(explain, explain_params, formula_length, beam, units)
    explain_params, explain_units = explained["explain_params"], explained["explain_units"]
    # Every name and option before the store is asked or a model built: a typo fails at once.
    announce_load_failures(context.host, strict_plugins_flag(strict_plugins or None))
    check_run(context.host, backend=backend, dataset_format=dataset_format, threshold=threshold,
              threshold_params=threshold_params, quantile=quantile, compat=compat, batch_size=batch_size,
              device=device, cache=cache, cache_budget=cache_budget, reporters=writers, make_rule=False,
              bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, explain=explain, explain_params=explain_params,
              explain_units=explain_units, workers=workers)
    check_rotation(rotate, rotate_seed)
    dataset_options = {k: v for k, v in dict(image_column=image_column, split=split, concepts=concepts,
                                              mask_columns=list(mask_columns) or None).items() if v is not None}
    out_dir = Path(out) if out else Path("dissection") / _safe_stem(model)
    started = time.perf_counter()
    job = Job(model=model, backend=backend, weights=weights, pretrained=pretrained, layers=layers, dataset=dataset,
              dataset_format=dataset_format, categories=tuple(_split(categories)) or None,
              dataset_options=dataset_options, threshold=threshold, threshold_params=threshold_params,
              quantile=quantile, compat=compat, top_k=top_k, skip_bad=skip_bad,
              backend_options=_backend_options(input_size, mean, std, bgr, runtime), device=device,
              batch_size=batch_size, workers=workers, reporters=writers, plot_formats=plot_formats, cache=cache,
              cache_budget=cache_budget, rotate=rotate,
              rotate_seed=rotate_seed, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
              explain=explain, explain_params=explain_params, explain_units=explain_units)
    store = None if no_store else ResultsStore(store_dir)
    with folder_lock(out_dir), RichProgress(context.err) as progress:  # one run at a time writes into --out
        result, outcome = dissect_stored(job, out_dir, store, context.host, progress,
                                         strict_plugins=strict_plugins or None)
    if outcome.cached:
        context.out.print(f"from the results store ({outcome.key}): no model ran; --no-store computes it again",
                          style="dim", highlight=False)
    context.print_summary(result, out_dir, None if outcome.cached else time.perf_counter() - started)


def _safe_stem(model: str) -> str:
    """The default output folder's name: a model file's stem or a model name, made safe for paths."""
    from .core.files import layer_dirnames

    stem = Path(model).stem if Path(model).suffix else model
    return layer_dirnames([stem])[stem]


@cli.command("layers")
@click.argument("model")
@click.option("--backend", help="Backend that loads MODEL (default: detected).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state dict or checkpoint file.")
@click.option("--all", "show_all", is_flag=True,
              help="Also list layers without a spatial map (vectors, 1×1 maps, attention probabilities).")
def layers_command(model: str, backend: str | None, weights: str | None, show_all: bool) -> None:
    """List the layers of MODEL that can be dissected: module names, the stages (stage:N) beside the
    module each one is, output shapes, and the default layer."""
    from .api import make_backend
    from .core.types import BackendOptions

    _setup_logging(0)
    name, model_backend = make_backend(_host(), model, backend, BackendOptions(weights=weights))
    infos = model_backend.layers()
    select = getattr(model_backend, "select_layers", None)
    spatial = [i for i in infos if i.spatial]
    default = select(None)[0] if select is not None else (spatial[-1].name if spatial else None)
    # Aliases (stage:N) are listed beside the module they resolve to, not as layers of their own.
    aliases = [i for i in infos if i.module is not None and i.module != i.name]
    stages_of: dict[str, list[str]] = {}
    for alias in aliases:
        stages_of.setdefault(alias.module, []).append(alias.name)  # type: ignore[arg-type]
    rows = [(info, stages_of.pop(info.name, [])) for info in infos if info not in aliases]
    # A stage whose map no listed module gives (timm's own name for it): a row of its own.
    rows += [(next(a for a in aliases if a.module == module), names) for module, names in stages_of.items()]
    table = Table(title=f"{model} ({name} backend)" + ("" if show_all else ": layers with a spatial map"))
    header = ("layer", "stage", "kind", "units", "map (h × w)")
    cells = []
    for info, stages in rows:
        if show_all or info.spatial:
            marker = "  (default)" if default == info.name or default in stages else ""
            cells.append((f"{info.module if info.name in stages else info.name}{marker}", " ".join(stages), info.kind,
                          str(info.shape[0]) if info.shape else "-",
                          f"{info.shape[1]} × {info.shape[2]}" if info.spatial else "-"))
    for i, column in enumerate(header):
        table.add_column(column, justify="right" if i >= 3 else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    # Layer names are there to be copied: the table takes the width they need rather than cutting them.
    needed = sum(max(len(c) for c in column) for column in zip(header, *cells, strict=True)) + 3 * len(header) + 1
    wide = Console(width=max(out_console.width, needed)) if needed > out_console.width else out_console
    wide.print(table)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON, for scripts.")
@_strict_option
@click.pass_obj
def plugins_command(context: CliContext, as_json: bool, strict_plugins: bool) -> None:
    """List every plugin, its version, what it provides, and every error: at load, at registration, and in
    recent runs (a run-time failure is kept until the same hook of the same plugin next runs fine)."""
    from .registry import strict_plugins as strict_from_env
    from .registry.failures import PluginFailure, raise_if_strict

    host = context.host
    runtime: dict[str, list[dict[str, str]]] = {}
    for entry in host.runtime_failures():
        runtime.setdefault(entry["plugin"], []).append(entry)
    if as_json:
        click.echo(json.dumps(plugins_listing(host, runtime), indent=2))
    else:
        _plugins_table(context, runtime)
    failures = host.load_failures() + [PluginFailure(e["plugin"], e["where"], e["error"])
                                       for entries in runtime.values() for e in entries]
    raise_if_strict(failures, strict_from_env(strict_plugins or None))


def plugins_listing(host: Any, runtime: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """What ``dissect plugins --json`` prints: every plugin with its errors, and every component by kind."""
    plugins = []
    for p in host.plugins:
        status = "error" if p.failures else "failed at run time" if runtime.get(p.name) else "ok"
        plugins.append({"name": p.name, "source": p.source, "version": p.version, "status": status,
                        "provides": list(p.provides),
                        "errors": [{"where": f.where, "error": f.error} for f in p.failures],
                        "runtime_errors": [{k: e.get(k) for k in ("where", "error", "when")}
                                           for e in runtime.get(p.name, [])]})
    components = {kind: [{"name": e.name, "plugin": e.plugin, "description": e.description,
                          **({"default": bool(e.metadata.get("default"))} if kind == "reporter" else {})}
                         for e in catalog]
                  for kind, catalog in host.catalogs.items()}
    return {"netdissection": __version__, "plugins": plugins, "components": components}


def _plugins_table(context: CliContext, runtime: dict[str, list[dict[str, str]]]) -> None:
    table = Table(title="netdissection plugins")
    for column in ("plugin", "from", "version", "provides", "status"):
        table.add_column(column)
    for p in context.host.plugins:
        if p.failures:
            status = Text(f"{len(p.failures)} error(s), below", style="red")
        elif runtime.get(p.name):
            status = Text("failed at run time, below", style="yellow")
        else:
            status = Text("ok", style="green")
        table.add_row(p.name, p.source, p.version, "\n".join(p.provides) or "-", status)
    context.out.print(table)
    for p in context.host.plugins:  # in full, outside the table, so that no column width cuts them
        for failure in p.failures:
            context.out.print(Text(f"{p.name} ({p.source}): {failure.where}: {failure.error}", style="red"),
                              soft_wrap=True)
        for entry in runtime.get(p.name, []):
            context.out.print(Text(f"{p.name} ({p.source}): {entry['where']}: {entry['error']} (in a run at "
                                   f"{entry.get('when', '?')})", style="yellow"), soft_wrap=True)


@cli.command("backends")
@click.pass_obj
def backends_command(context: CliContext) -> None:
    """List the backends, what each accepts, and the order in which they claim a MODEL."""
    import importlib.util

    host = context.host
    # pluggy calls tryfirst, then normal (latest registered first), then trylast implementations.
    asked = [impl.plugin_name for impl in reversed(host.hook.dissect_detect_backend.get_hookimpls())]
    table = Table(title="backends: without --backend, the first to claim MODEL loads it (order column); "
                        ".onnx → onnx, torchvision names → torchvision, other timm names → timm")
    for column in ("order", "backend", "plugin", "accepts", "runtimes", "needs"):
        table.add_column(column)
    entries = sorted(host.catalog("backend"), key=lambda e: asked.index(e.plugin) if e.plugin in asked else len(asked))
    for entry in entries:
        order = str(asked.index(entry.plugin) + 1) if entry.plugin in asked else "-"
        needs = [f"{package} {'ok' if importlib.util.find_spec(package) else 'missing'}"
                 for package in entry.metadata.get("requires", ())]
        # A backend class says which --runtime it takes (Backend.runtimes) without loading a model.
        runtimes = ", ".join(getattr(entry.factory, "runtimes", ())) or "-"
        table.add_row(order, entry.name, entry.plugin, str(entry.metadata.get("accepts", entry.description)),
                      runtimes, ", ".join(needs) or "-")
    context.out.print(table)


_CONTEXT: CliContext | None = None


def _context(plugins: Sequence[Any] = ()) -> CliContext:
    """The context of this CLI invocation (a fresh plugin host per ``main``)."""
    global _CONTEXT
    if _CONTEXT is None:
        from .registry import build_host

        _CONTEXT = CliContext(host=build_host(extra_plugins=tuple(plugins)), out=out_console, err=err_console)
    return _CONTEXT


def _host() -> Any:
    return _context().host


def build_cli(context: CliContext | None = None) -> click.Group:
    """The command group with every plugin's subcommands added, on a copy of the built-in group (so that
    building it again starts from the built-ins).

    Each plugin's hook is called on its own so that its commands are attributed to it in ``dissect plugins``
    and a plugin whose hook raises is recorded without breaking the CLI.
    """
    context = context if context is not None else _context()
    host = context.host
    group = copy.copy(cli)
    group.commands = dict(cli.commands)
    for impl in host.hook.dissect_register_commands.get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue
        before = set(group.commands)
        arguments = {"cli": group, "context": context}
        try:
            impl.function(*[arguments[name] for name in impl.argnames])
        except Exception as exc:
            host.record_failure(impl.plugin_name, "dissect_register_commands", exc)
            continue
        record = host.record(impl.plugin_name)
        if record is not None:
            record.provides.extend(f"command:{name}" for name in sorted(set(group.commands) - before))
    return group


#: What Ctrl-C ends a command with (exit status 130): a stopped run leaves no activation cache, no file
#: written half, no summary.json of results it did not finish.
INTERRUPTED = "interrupted: nothing half-written is left behind"


def main(argv: Sequence[str] | None = None, *, plugins: Sequence[Any] = ()) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2.

    ``plugins``: plugin objects to register besides the installed ones (``netdissection.testing`` runs the
    CLI with a plugin under test this way)."""
    global _CONTEXT
    _CONTEXT = None
    try:
        context = _context(plugins)
        group = build_cli(context)
        group.main(args=list(argv) if argv is not None else None, prog_name="dissect", standalone_mode=False,
                   obj=context)
    except DissectionError as exc:
        # escaped: a message may hold brackets (pip install 'netdissection[ray]') that are not markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C inside a command into Abort
        err_console.print(INTERRUPTED if isinstance(exc.__context__, KeyboardInterrupt) else "aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print(INTERRUPTED)
        sys.exit(130)
    except OSError as exc:
        from .core.descriptors import is_out_of_descriptors, out_of_descriptors
        from .core.space import is_disk_full

        if is_out_of_descriptors(exc):  # wherever it happened (the workers' own say more: see core.loading)
            err_console.print(f"[bold red]error:[/] {escape(str(out_of_descriptors('the run')))}", highlight=False,
                              soft_wrap=True)
            sys.exit(2)
        if not is_disk_full(exc):
            raise
        # Where the run did not say which folder filled up (each place that writes results does): still one line.
        where = f" writing {exc.filename}" if exc.filename else ""
        err_console.print(f"[bold red]error:[/] no space left on the device{where}; free some space and run it again",
                          highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def console_main(argv: Sequence[str] | None = None) -> None:
    """The ``dissect`` command: :func:`main`, then the way out of the interpreter. Once the command has
    ended a Ctrl-C has nothing left to stop, and would only print a traceback from an exit handler.

    The objects still alive then are frozen out of garbage collection, and the command leaves as the
    interpreter would (:func:`_leave`) but without tearing the interpreter down: every file has been written
    and closed by then, and what is left is memory the process hands back whole. An exception other than
    the command's exit leaves the usual way, with its traceback.

    Before anything else, glibc's allocator is set to reuse the pages of one batch for the next
    (``core.malloc``): the command owns its process, which the library does not."""
    malloc.tune_for_batches()
    try:
        main(argv)
    except SystemExit as done:
        code = done.code
    else:
        code = None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.freeze()
    _leave(code)


def _leave(code: object) -> NoReturn:
    """End the process with ``sys.exit(code)``'s status, after what the interpreter does on its way out —
    other threads joined, exit handlers run (logging's, multiprocessing's, temporary folders' finalizers),
    output flushed — but not its teardown: freeing every module and object, torch's and its libraries'
    destructors included, touches pages of every library the run loaded (100–150 MB more peak memory for a
    resnet18 run, and a tenth of a second) only for the memory to be handed back whole."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # as the interpreter does with sys.exit("message")
        print(code, file=sys.stderr)
        status = 1
    shutdown = getattr(threading, "_shutdown", None)  # the interpreter's own first step: join non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream has nothing left to flush
            stream.flush()
    os._exit(status & 0xFF)


if __name__ == "__main__":  # pragma: no cover
    console_main()
