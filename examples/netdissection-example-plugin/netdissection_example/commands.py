"""``dissect npz-info PATH``: what an npz concept set holds. Built with the command context the host hands
the plugin: its host (to open the set as ``dissect`` does), its consoles, logging and option helpers."""

from __future__ import annotations

from typing import Any

import click

import netdissection


def npz_info_command(context: Any) -> click.Command:
    @click.command("npz-info")
    @click.argument("path")
    @context.verbose_option
    def npz_info(path: str, verbose: int) -> None:
        """Show the images, categories and concepts of the npz concept set at PATH."""
        from rich.table import Table

        context.setup_logging(verbose)
        dataset = netdissection.open_dataset(path, format="npz", host=context.host)
        sample = dataset.load(0, image=True, labels=True)
        context.out.print(f"{path}: npz concept set, {len(dataset)} images of {sample.image.shape[1]}×"
                          f"{sample.image.shape[0]} px, labels {sample.label_shape[1]}×{sample.label_shape[0]}",
                          highlight=False, soft_wrap=True)
        table = Table(title="concepts per category")
        table.add_column("category")
        table.add_column("concepts", justify="right")
        for category in dataset.vocabulary.categories:
            count = sum(1 for c in dataset.vocabulary.concepts if c.category == category)
            table.add_row(category, str(count))
        context.out.print(table)

    return npz_info
