"""The loader: its worker processes decode ahead of the model at a lower priority than the model's process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from netdissection.api import resolve_dataset
from netdissection.core import loading
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.registry import build_host


def niceness_here(_layers: torch.Tensor, _image_labels: torch.Tensor) -> int:
    """A ``prepare`` for ``loading.iterate``: it runs in the worker process, and reports that process's niceness."""
    return os.nice(0)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="the platform has no process niceness")
def test_workers_run_at_a_lower_priority_than_the_model(tmp_path: Path) -> None:
    root = generate_concept_set(tmp_path / "set", images=4, image_size=32, seed=0)
    dataset = resolve_dataset(build_host(entry_points=False), str(root), None, None)
    batches = list(loading.iterate(dataset, batch_size=2, workers=2, image=True, labels=True, skip_bad=False,
                                   prepare=niceness_here))
    here = os.nice(0)
    assert [b.prepared for b in batches] == [min(19, here + loading.LOADER_NICENESS)] * 2
    # Without workers the batches are made here, at this process's own priority, which nothing changed.
    (alone,) = loading.iterate(dataset, batch_size=4, workers=0, image=True, labels=True, skip_bad=False,
                               prepare=niceness_here)
    assert alone.prepared == here == os.nice(0)
