"""The ``dissect`` command: ``dissect MODEL [options]`` plus subcommands (layers, plugins, backends, ...).

Plugins add subcommands through the ``dissect_register_commands(cli)`` hook.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
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

from . import __version__
from .core.errors import DissectionError

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

    One live display serves the whole run, so finished bars stay on screen as they were.
    """

    def __init__(self, console: Console) -> None:
        self._progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                  _Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=console, transient=False)
        self._task: Any = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, name: str, total: int) -> None:
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


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(message)s", handlers=[handler], force=True)


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netdissection")
def cli() -> None:
    """Network Dissection: label the units of a vision network with human concepts.

    \b
      dissect MODEL [options]      dissect a model (same as: dissect run MODEL)
      dissect layers MODEL         list the layers of a model
      dissect report RESULTS_DIR   rebuild the reports of a finished run
      dissect data ...             download Broden; inspect, validate, convert datasets
      dissect backends             list backends and what they accept
      dissect plugins              list installed plugins
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
@click.option("--quantile", "quantile", type=float, default=0.005, show_default=True,
              help="Top fraction q: each unit's threshold is its (1 - q) activation quantile.")
@click.option("--compat", type=click.Choice(["paper", "lite"]), default="paper", show_default=True,
              help="'lite' reproduces NetDissect-Lite's numbers.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: dissection/MODEL).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--workers", type=int, help="Data loading processes (default: cores - 1, at most 4).")
@click.option("--top-k", type=int, default=10, show_default=True, help="Top images kept per unit.")
@click.option("--report", "reporters", multiple=True, help="Report writers to run (default: all defaults).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images or labels instead of stopping.")
@click.option("--input-size", type=_size, metavar="H,W", help="Model input size H,W or S (models with a fixed input).")
@click.option("--mean", type=_triple, metavar="R,G,B", help="Input normalisation mean (default: the model's).")
@click.option("--std", type=_triple, metavar="R,G,B", help="Input normalisation std (default: the model's).")
@click.option("--bgr", is_flag=True, help="The model takes BGR channel order.")
@click.option("--image-column", help="Dataset image column (HuggingFace datasets).")
@click.option("--mask-column", "mask_columns", multiple=True, help="Dataset mask column (repeatable).")
@click.option("--split", help="Dataset split (HuggingFace datasets).")
@click.option("--concepts", type=click.Path(dir_okay=False),
              help="Concepts file naming label ids: id,name,category CSV or id2label JSON (HuggingFace datasets).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def run_command(model: str, backend: str | None, weights: str | None, pretrained: bool, dataset: str | None,
                dataset_format: str | None, layers: tuple[str, ...], categories: tuple[str, ...],
                quantile: float, compat: str, out: str | None, batch_size: int, device: str,
                workers: int | None, top_k: int, reporters: tuple[str, ...], skip_bad: bool,
                input_size: tuple[int, int] | None, mean: tuple[float, float, float] | None,
                std: tuple[float, float, float] | None, bgr: bool, image_column: str | None,
                mask_columns: tuple[str, ...], split: str | None, concepts: str | None, verbose: int) -> None:
    """Dissect MODEL: a model name (resnet18, ...) or a model file."""
    from .core.run import dissect

    _setup_logging(verbose + 1)
    backend_options = {k: v for k, v in dict(input_size=input_size, mean=mean, std=std).items() if v is not None}
    if bgr:
        backend_options["bgr"] = True
    dataset_options = {k: v for k, v in dict(image_column=image_column, split=split, concepts=concepts,
                                              mask_columns=list(mask_columns) or None).items() if v is not None}
    out_dir = Path(out) if out else Path("dissection") / _safe_stem(model)
    started = time.perf_counter()
    with RichProgress(err_console) as progress:
        result = dissect(model, backend=backend, dataset=dataset, dataset_format=dataset_format,
                         layers=list(layers) or None, categories=_split(categories) or None, quantile=quantile,
                         compat=compat, out=out_dir, batch_size=batch_size, device=device, workers=workers,
                         weights=weights, pretrained=pretrained, top_k=top_k, reporters=list(reporters) or None,
                         skip_bad=skip_bad, progress=progress, host=_host(),
                         backend_options=backend_options, dataset_options=dataset_options)
    from .summary import print_summary

    print_summary(out_console, result, out_dir, time.perf_counter() - started)


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
    from .core.run import make_backend
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
def plugins_command() -> None:
    """List every plugin, its version, what it provides, and any load error."""
    host = _host()
    table = Table(title="netdissection plugins")
    for column in ("plugin", "from", "version", "provides", "status"):
        table.add_column(column)
    for p in host.plugins:
        status = Text("error (below)", style="red") if p.error else Text("ok", style="green")
        table.add_row(p.name, p.source, p.version, "\n".join(p.provides) or "-", status)
    out_console.print(table)
    for p in host.plugins:
        if p.error:  # in full, outside the table, so that no column width cuts it
            out_console.print(Text(f"{p.name} ({p.source}): {p.error}", style="red"), soft_wrap=True)


@cli.command("backends")
def backends_command() -> None:
    """List the backends, what each accepts, and the order in which they claim a MODEL."""
    import importlib.util

    host = _host()
    # pluggy calls tryfirst, then normal (latest registered first), then trylast implementations.
    asked = [impl.plugin_name for impl in reversed(host.hook.dissect_detect_backend.get_hookimpls())]
    table = Table(title="backends: without --backend, the first to claim MODEL loads it (order column); "
                        ".onnx → onnx, torchvision names → torchvision, other timm names → timm")
    for column in ("order", "backend", "plugin", "accepts", "needs"):
        table.add_column(column)
    entries = sorted(host.catalog("backend"), key=lambda e: asked.index(e.plugin) if e.plugin in asked else len(asked))
    for entry in entries:
        order = str(asked.index(entry.plugin) + 1) if entry.plugin in asked else "-"
        needs = [f"{package} {'ok' if importlib.util.find_spec(package) else 'missing'}"
                 for package in entry.metadata.get("requires", ())]
        table.add_row(order, entry.name, entry.plugin, str(entry.metadata.get("accepts", entry.description)),
                      ", ".join(needs) or "-")
    out_console.print(table)


_HOST: Any = None


def _host() -> Any:
    global _HOST
    if _HOST is None:
        from .registry import build_host

        _HOST = build_host()
    return _HOST


def build_cli() -> click.Group:
    """The command group with every plugin's subcommands added.

    Each plugin's hook is called on its own so that its commands are attributed to it in
    ``dissect plugins`` and a plugin whose hook raises is recorded without breaking the CLI.
    """
    host = _host()
    records = {r.name: r for r in host.plugins}
    for impl in host.hook.dissect_register_commands.get_hookimpls():
        before = set(cli.commands)
        record = records.get(impl.plugin_name)
        try:
            impl.function(cli=cli)
        except Exception as exc:
            log.warning("plugin %s failed to add commands: %s", impl.plugin_name, exc)
            if record is not None:
                record.error = f"{type(exc).__name__} in dissect_register_commands: {exc}"
            continue
        if record is not None:
            record.provides.extend(f"command:{name}" for name in sorted(set(cli.commands) - before))
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    global _HOST
    _HOST = None
    try:
        group = build_cli()
        group.main(args=list(argv) if argv is not None else None, prog_name="dissect", standalone_mode=False)
    except DissectionError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted: no result was written")
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
