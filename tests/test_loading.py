"""The loader: its worker processes decode ahead of the model at a lower priority than the model's process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
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


class MarksItsFirstLoad:
    """A concept dataset that leaves a file behind when a worker process decodes its first sample."""

    def __init__(self, dataset: object, marker: Path) -> None:
        self.dataset, self.marker = dataset, marker

    def __getattr__(self, name: str) -> object:
        if name == "dataset":  # not set yet (an object being unpickled): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def load(self, index: int, **parts: bool) -> object:
        if os.getpid() != PARENT:
            self.marker.touch()
        return self.dataset.load(index, **parts)  # type: ignore[attr-defined]


PARENT = os.getpid()


def test_the_first_batches_are_decoded_while_the_model_is_built(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``dissect`` starts the activation pass's loader before it builds the model: the workers decode
    while the main process imports the model's library and reads its weights. The results are those of a run
    that starts it later."""
    import netdissection
    from netdissection import api

    root = generate_concept_set(tmp_path / "set", images=10, image_size=32, seed=0)
    dataset = resolve_dataset(build_host(entry_points=False), str(root), None, None)
    marker = tmp_path / "decoded"
    built = api.make_backend
    seen: list[bool] = []

    def build_after_a_decode(*args: object, **kwargs: object) -> object:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(marker.exists())
        return built(*args, **kwargs)

    monkeypatch.setattr(api, "make_backend", build_after_a_decode)
    options: dict[str, object] = dict(layers=["layer4"], batch_size=4, workers=2)
    early = netdissection.dissect("resnet18", dataset=MarksItsFirstLoad(dataset, marker), **options)
    assert seen == [True]
    monkeypatch.setattr(api, "make_backend", built)
    plain = netdissection.dissect("resnet18", dataset=dataset, **options)
    np.testing.assert_array_equal(early.layers["layer4"].thresholds, plain.layers["layer4"].thresholds)
    np.testing.assert_array_equal(early.layers["layer4"].intersection, plain.layers["layer4"].intersection)
