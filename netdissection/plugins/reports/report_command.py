"""``dissect report RESULTS_DIR``: rebuild the reports of a finished run from its saved results.

Only the saved counts, thresholds and top images are read (``load_run``): no model runs. The HTML
report reopens the run's dataset from the provenance for its image strips.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ...core.hookspecs import hookimpl


@hookimpl
def dissect_register_commands(cli: click.Group) -> None:
    if "report" in cli.commands:  # added by an earlier build of the CLI, or replaced by a later plugin: keep it
        return
    cli.add_command(report_command)


@click.command("report")
@click.argument("results_dir", metavar="RESULTS_DIR")
@click.option("--top-k", type=int, help="Images per unit in the HTML report (default: all the run kept).")
@click.option("--report", "reporters", multiple=True,
              help="Report writer to run (repeatable; default: every default writer). See: dissect plugins.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def report_command(results_dir: str, top_k: int | None, reporters: tuple[str, ...], verbose: int) -> None:
    """Rebuild the reports (HTML, plots, tally...) of the finished run in RESULTS_DIR, without the model."""
    from ...cli import _host, _setup_logging, out_console
    from ...summary import print_summary

    _setup_logging(verbose + 1)
    started = time.perf_counter()
    host = _host()
    result = rebuild_reports(host, Path(results_dir), reporters=list(reporters) or None, top_k=top_k)
    # The run's own pass timings belong to the run, not to this rebuild: say only how long the rebuild took.
    print_summary(out_console, result, Path(results_dir))
    out_console.print(f"reports rebuilt from the saved results in {time.perf_counter() - started:.1f} s")


def rebuild_reports(host: Any, results_dir: Path, *, reporters: list[str] | None = None,
                    top_k: int | None = None) -> Any:
    """Load the run in ``results_dir`` and write its reports again; returns the run (``written`` set)."""
    from ...core.errors import DissectionError
    from ...core.reporting import write_reports
    from ...core.results import load_run

    if not results_dir.exists():
        raise DissectionError(f"results folder {results_dir} does not exist; pass the --out folder of a "
                              "finished dissection")
    if not results_dir.is_dir():
        raise DissectionError(f"{results_dir} is not a folder; pass the --out folder of a finished dissection")
    if top_k is not None and top_k < 1:
        raise DissectionError(f"--top-k must be at least 1, not {top_k}")
    result = load_run(results_dir)
    options = {"html": {"top_k": top_k}} if top_k is not None else None
    write_reports(host, result, results_dir, reporters, options=options)
    return result
