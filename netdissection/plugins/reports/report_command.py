"""``dissect report RESULTS_DIR``: rebuild the reports of a finished run from its saved results.

Only the saved counts, thresholds and top images are read (``load_results``): no model runs. The HTML
report reopens the run's dataset from the provenance for its image strips. Like any plugin command, it
uses only the public API and the command context the host hands it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ...core.errors import DissectionError
from ...core.hookspecs import CommandContext, hookimpl
from .plots import COPY_FORMATS


@hookimpl
def dissect_register_commands(cli: click.Group) -> None:
    if "report" in cli.commands:  # replaced by a plugin registered earlier: keep theirs
        return
    cli.add_command(report_command)


@click.command("report")
@click.argument("results_dir", metavar="RESULTS_DIR")
@click.option("--top-k", type=int, help="Images per unit in the HTML report (default: all the run kept).")
@click.option("--report", "reporters", multiple=True,
              help="Report writers to run: NAME or NAME,NAME (repeatable; default: every default writer). "
                   "See: dissect plugins.")
@click.option("--plot-format", "plot_formats", multiple=True, type=click.Choice(COPY_FORMATS),
              help="Also write each plot as PNG or PDF (repeatable); SVG is always written.")
@click.option("--strict-plugins", is_flag=True,
              help="Any plugin failure is an error (exit status 2); also NETDISSECTION_STRICT_PLUGINS=1.")
@click.option("-v", "--verbose", count=True, help="More log output; repeat for more.")
@click.pass_obj
def report_command(context: CommandContext, results_dir: str, top_k: int | None, reporters: tuple[str, ...],
                   plot_formats: tuple[str, ...], strict_plugins: bool, verbose: int) -> None:
    """Rebuild the reports (HTML, plots, tally...) of the finished run in RESULTS_DIR, without the model."""
    context.setup_logging(verbose + 1)
    started = time.perf_counter()
    result = rebuild_reports(context.host, Path(results_dir), reporters=context.split(reporters) or None,
                             top_k=top_k, plot_formats=plot_formats, strict_plugins=strict_plugins or None)
    # The run's own pass timings belong to the run, not to this rebuild: say only how long the rebuild took.
    context.print_summary(result, Path(results_dir))
    context.out.print(f"reports rebuilt from the saved results in {time.perf_counter() - started:.1f} s")


def rebuild_reports(host: Any, results_dir: Path, *, reporters: list[str] | None = None,
                    top_k: int | None = None, plot_formats: Sequence[str] = (),
                    strict_plugins: bool | None = None) -> Any:
    """Load the run in ``results_dir`` and write its reports again; returns the run (``written`` set)."""
    from ... import load_results, write_reports

    if not results_dir.exists():
        raise DissectionError(f"results folder {results_dir} does not exist; pass the --out folder of a "
                              "finished dissection")
    if not results_dir.is_dir():
        raise DissectionError(f"{results_dir} is not a folder; pass the --out folder of a finished dissection")
    if top_k is not None and top_k < 1:
        raise DissectionError(f"--top-k must be at least 1, not {top_k}")
    result = load_results(results_dir)
    write_reports(result, results_dir, reporters=reporters,
                  writer_options={"top_k": top_k, "plot_formats": list(plot_formats) or None}, host=host,
                  strict_plugins=strict_plugins)
    return result
