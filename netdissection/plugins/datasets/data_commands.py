"""``dissect data ...``: download Broden, show what a concept set holds, validate it, convert between formats.

Every command opens datasets through the dataset catalog (``netdissection.open_dataset`` with the host of
the command context), so a third-party dataset plugin is inspected, validated and converted like the
built-in formats. A format that registers ``validate=`` (the folder
format) gets its own thorough check; any other is validated by loading every sample. A format that
registers ``writer=`` can be a ``convert`` target (Broden's writer lives in ``broden_writer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ...core.errors import DissectionError, UnknownNameError
from ...core.hookspecs import CommandContext, hookimpl

F = Callable[..., Any]


@hookimpl
def dissect_register_commands(cli: click.Group) -> None:
    if "data" not in cli.commands:  # replaced by a plugin registered earlier: keep theirs
        cli.add_command(data_group)


@click.group("data")
def data_group() -> None:
    """Concept datasets: download Broden, show what a set holds, validate and convert it.

    \b
      dissect data download broden1_224       fetch, unpack and verify Broden
      dissect data info PATH                  images, concepts, label coverage per category
      dissect data validate PATH              every problem of a folder dataset, with its file
      dissect data convert SRC DEST           write SRC as Broden (or --format folder / hf)
    """


def dataset_options(command: F) -> F:
    """The options that say how to open a dataset (as ``dissect run`` takes them)."""
    options = [
        click.option("--dataset-format", help="Dataset format, when it cannot be detected (broden, folder, hf)."),
        click.option("--categories", multiple=True, help="Comma-separated categories to use (default: all)."),
        click.option("--image-column", help="Image column (HuggingFace datasets)."),
        click.option("--mask-column", "mask_columns", multiple=True,
                     help="Label column NAME or NAME:CATEGORY (HuggingFace datasets; repeatable)."),
        click.option("--split", help="Split (HuggingFace datasets)."),
        click.option("--concepts", type=click.Path(dir_okay=False),
                     help="Concepts file naming label ids: id,name,category CSV or id2label JSON (HuggingFace)."),
        click.option("-v", "--verbose", count=True, help="More log output; repeat for more."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def open_dataset(context: CommandContext, path: str, dataset_format: str | None, categories: tuple[str, ...],
                 image_column: str | None, mask_columns: tuple[str, ...], split: str | None,
                 concepts: str | None) -> Any:
    """Open a dataset as ``dissect run`` does, without importing the passes (torch): seconds of start-up
    that checking or converting a dataset does not need."""
    from ... import open_dataset as open_public

    options = {k: v for k, v in dict(image_column=image_column, split=split, concepts=concepts,
                                     mask_columns=list(mask_columns) or None).items() if v is not None}
    return open_public(path, format=dataset_format, categories=context.split(categories) or None,
                       host=context.host, **options)


def _progress(context: CommandContext, description: str, total: int | None, transfer: bool = False) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = (DownloadColumn(), TransferSpeedColumn()) if transfer else (MofNCompleteColumn(),)
    progress = Progress(TextColumn(f"{description:<12}"), BarColumn(), *counts, TimeRemainingColumn(),
                        console=context.err, transient=True)
    return progress, progress.add_task(description, total=total)


# ------------------------------------------------------------------------------------------------ download


@data_group.command("download")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False),
              help="Folder that receives NAME/ (default: the netdissection cache folder).")
@click.option("--mirror", help="Another host: a base URL serving NAME.zip, or the URL of the archive itself.")
@click.option("--keep-zip", is_flag=True, help="Keep the archive after unpacking.")
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
              help="Resume this many times after a broken connection.")
@click.option("-v", "--verbose", count=True, help="More log output; repeat for more.")
@click.pass_obj
def download_command(context: CommandContext, name: str, dest: str | None, mirror: str | None, keep_zip: bool,
                     retries: int, verbose: int) -> None:
    """Download Broden NAME (broden1_224, broden1_227, broden1_384): resumable, unpacked and verified."""
    from .download import default_dest, download_broden

    context.setup_logging(verbose + 1)
    out_console = context.out
    progress, task = _progress(context, name, None, transfer=True)

    def advance(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        target, layout = download_broden(name, Path(dest) if dest else default_dest(), mirror=mirror,
                                         keep_zip=keep_zip, retries=retries, progress=advance)
    out_console.print(f"{target}: {layout.images} images, {layout.label_files} label files, categories "
                      f"{', '.join(layout.categories)}; verified against index.csv")
    out_console.print(f"use it with: dissect MODEL --dataset {target}", highlight=False)


# ------------------------------------------------------------------------------------------------ info


@data_group.command("info")
@click.argument("path")
@dataset_options
@click.option("--workers", type=int, help="Label decoding processes (default: cores - 1, at most 4).")
@click.pass_obj
def info_command(context: CommandContext, path: str, dataset_format: str | None, categories: tuple[str, ...],
                 image_column: str | None, mask_columns: tuple[str, ...], split: str | None, concepts: str | None,
                 verbose: int, workers: int | None) -> None:
    """Show the images, concepts and label coverage per category of the concept dataset at PATH."""
    from rich.table import Table

    from ...core.loading import default_workers

    context.setup_logging(verbose)
    out_console = context.out
    dataset = open_dataset(context, path, dataset_format, categories, image_column, mask_columns, split, concepts)
    stats, failures, sizes = scan_labels(context, dataset, default_workers() if workers is None else workers)
    described = dataset.describe()
    out_console.print(f"[bold]{path}[/]: {described.get('format', '?')} format, {len(dataset)} images, "
                      f"{len(dataset.vocabulary.concepts)} concepts in {len(dataset.vocabulary.categories)} "
                      f"categories; label maps {', '.join(f'{h}×{w}' for h, w in sorted(sizes)) or '-'} (h×w)",
                      highlight=False, soft_wrap=True)
    table = Table(title="label coverage per category")
    for column, justify in (("category", "left"), ("labels", "left"), ("concepts", "right"),
                            ("concepts seen", "right"), ("images", "right"), ("pixel coverage", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for c in stats.categories():
        table.add_row(c.name, c.level, str(c.concepts), str(c.concepts_seen), str(c.images), f"{100 * c.coverage:.1f}%")
    out_console.print(table)
    out_console.print("pixel coverage: the share of all label pixels that carry a concept of the category "
                      "(image-level labels cover their whole image)", style="dim", soft_wrap=True)
    if failures:
        raise DissectionError(f"{failures} sample(s) of {path} could not be read; see: dissect data validate {path}")


def scan_labels(context: CommandContext, dataset: Any, workers: int) -> tuple[Any, int, set[tuple[int, int]]]:
    """Label statistics of every sample (decoded in worker processes); the unreadable ones are counted."""
    import logging

    from ...core import loading
    from .data_stats import LabelStats

    stats = LabelStats(dataset.vocabulary)
    failures = 0
    sizes: set[tuple[int, int]] = set()
    progress, task = _progress(context, "labels", len(dataset))
    quiet = logging.getLogger(loading.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # skipped samples are counted and reported once, not logged one by one
    try:
        with progress:
            for batch in loading.iterate(dataset, batch_size=16, workers=workers, image=False, labels=True,
                                         skip_bad=True):
                failures += len(batch.failures)
                if batch.layers is not None:
                    sizes.add(batch.label_shape)
                    for layers, levels in zip(batch.layers.numpy(), batch.image_labels.numpy(), strict=True):
                        stats.add(layers, levels[levels > 0].tolist(), batch.label_shape)
                progress.advance(task, len(batch.indices) + len(batch.failures))
    finally:
        quiet.setLevel(level)
    return stats, failures, sizes


# ------------------------------------------------------------------------------------------------ validate


@data_group.command("validate")
@click.argument("path")
@dataset_options
@click.pass_obj
def validate_command(context: CommandContext, path: str, dataset_format: str | None, categories: tuple[str, ...],
                     image_column: str | None, mask_columns: tuple[str, ...], split: str | None, concepts: str | None,
                     verbose: int) -> None:
    """Check the concept dataset at PATH and report every problem at once (exit status 2 if any)."""
    from .folder_dataset import CONCEPTS, SAMPLES

    context.setup_logging(verbose)
    out_console = context.out
    root = Path(path).expanduser()
    fmt = dataset_format
    if fmt is None and root.is_dir() and ((root / CONCEPTS).is_file() or (root / SAMPLES).is_file()):
        fmt = "folder"  # even with one of the two files missing: that is a problem to report, not a mystery
    validate = context.host.component("dataset", fmt).metadata.get("validate") if fmt else None
    started = time.perf_counter()
    if validate is not None:
        progress, task = _progress(context, "checking", None)
        with progress:
            report = validate(root, progress=lambda done: progress.update(task, completed=done))
        # A plugin's report lists problems (strings, or objects that can name their file under the root).
        problems = [p.located(root) if hasattr(p, "located") else str(p) for p in report.problems]
        summary = report.summary() if hasattr(report, "summary") else f"{path} checked"
    else:
        dataset = open_dataset(context, path, dataset_format, categories, image_column, mask_columns, split,
                               concepts)
        problems, summary = _validate_by_loading(context, dataset)
    for problem in problems:
        out_console.print(problem, highlight=False, soft_wrap=True)
    if problems:
        raise DissectionError(f"{len(problems)} problem(s) in {path} (listed above)")
    out_console.print(f"{path}: OK — {summary} (checked in {time.perf_counter() - started:.1f} s)", highlight=False,
                      soft_wrap=True)


def _size(size: tuple[int, int] | None) -> str:
    return f"{size[0]}×{size[1]}" if size else "-"


def _validate_by_loading(context: CommandContext, dataset: Any) -> tuple[list[str], str]:
    """Any format: load every sample (image and labels), collect every error, and find empty categories."""
    from .data_stats import LabelStats

    stats = LabelStats(dataset.vocabulary)
    problems: list[str] = []
    image_sizes: set[tuple[int, int]] = set()
    progress, task = _progress(context, "checking", len(dataset))
    with progress:
        for index in range(len(dataset)):
            try:
                sample = dataset.load(index, image=True, labels=True)
            except DissectionError as exc:
                problems.append(str(exc))
            else:
                image_sizes.add(sample.image.shape[:2])
                stats.add(sample.layers, sample.image_labels, sample.label_shape)
            progress.advance(task)
    if len(image_sizes) > 1:
        problems.append(f"the images have {len(image_sizes)} different sizes "
                        f"({', '.join(_size(s) for s in sorted(image_sizes)[:4])}); a run needs one size")
    per_category = stats.categories()
    if stats.images:
        problems += [f"the category {c.name!r} is empty: none of its {c.concepts} concept(s) occurs in any sample"
                     for c in per_category if not c.images]
    summary = f"{len(dataset)} images, {len(dataset.vocabulary.concepts)} concepts; images per category: " + \
        ", ".join(f"{c.name} {c.images}" for c in per_category)
    return problems, summary


# ------------------------------------------------------------------------------------------------ convert


def writer_for(host: Any, fmt: str) -> Callable[..., Path]:
    """The writer of dataset format ``fmt``: registered as ``writer=`` metadata; Broden's is built in."""
    from .broden_writer import write_broden

    catalog = host.catalog("dataset")
    writers: dict[str, Callable[..., Path]] = {"broden": write_broden}
    for entry in catalog:
        if entry.metadata.get("writer") is not None:
            writers[entry.name] = entry.metadata["writer"]
    if fmt not in writers:
        raise UnknownNameError("dataset format to write", fmt, list(writers))
    return writers[fmt]


@data_group.command("convert")
@click.argument("src")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--format", "target_format", default="broden", show_default=True,
              help="Format to write: broden, folder, hf (or any format a plugin can write).")
@dataset_options
@click.pass_obj
def convert_command(context: CommandContext, src: str, dest: str, target_format: str, dataset_format: str | None,
                    categories: tuple[str, ...], image_column: str | None, mask_columns: tuple[str, ...],
                    split: str | None, concepts: str | None, verbose: int) -> None:
    """Convert the concept dataset SRC (folder, HuggingFace, Broden) into a new folder DEST."""
    context.setup_logging(verbose + 1)
    out_console = context.out
    write = writer_for(context.host, target_format)
    dataset = open_dataset(context, src, dataset_format, categories, image_column, mask_columns, split, concepts)
    started = time.perf_counter()
    progress, task = _progress(context, "converting", len(dataset))
    with progress:
        write(dataset, Path(dest), progress=lambda done: progress.update(task, completed=done))
    out_console.print(f"wrote {len(dataset)} images, {len(dataset.vocabulary.concepts)} concepts as "
                      f"{target_format} to {dest} in {time.perf_counter() - started:.1f} s", highlight=False)
