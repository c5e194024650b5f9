"""Batches of samples from a concept dataset, decoded ahead of the model in worker processes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DissectionError
from .protocols import ConceptDataset

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Consecutive samples of one size. ``indices`` are dataset positions."""

    indices: np.ndarray
    images: torch.Tensor | None  # (N, H, W, 3) uint8
    layers: torch.Tensor | None  # (N, K, sh, sw) int64, padded with 0
    image_labels: torch.Tensor | None  # (N, J) int64, padded with 0
    label_shape: tuple[int, int]
    failures: list[str]


class _Failed:
    """A sample that could not be loaded; carried to the main process as data, not as a traceback."""

    def __init__(self, index: int, message: str) -> None:
        self.index, self.message = index, message


class _Parts(Dataset):
    def __init__(self, dataset: ConceptDataset, image: bool, labels: bool) -> None:
        self.dataset, self.image, self.labels = dataset, image, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        try:
            return self.dataset.load(index, image=self.image, labels=self.labels)
        except DissectionError as exc:
            return _Failed(index, str(exc))


def _collate(samples: list) -> Batch:  # type: ignore[type-arg]
    failures = [s.message for s in samples if isinstance(s, _Failed)]
    good = [s for s in samples if not isinstance(s, _Failed)]
    indices = np.array([s.index for s in good], dtype=np.int64)
    if not good:
        return Batch(indices, None, None, None, (0, 0), failures)
    images = None
    if good[0].image is not None:
        images = torch.from_numpy(np.stack([s.image for s in good]))
    layers = image_labels = None
    shape = good[0].label_shape
    if good[0].layers is not None:
        k = max(s.layers.shape[0] for s in good)
        stacked = np.zeros((len(good), k, *shape), dtype=np.int64)
        for i, s in enumerate(good):
            stacked[i, : s.layers.shape[0]] = s.layers
        layers = torch.from_numpy(stacked)
        j = max((len(s.image_labels) for s in good), default=0)
        levels = np.zeros((len(good), j), dtype=np.int64)
        for i, s in enumerate(good):
            levels[i, : len(s.image_labels)] = s.image_labels
        image_labels = torch.from_numpy(levels)
    return Batch(indices, images, layers, image_labels, shape, failures)


def default_workers() -> int:
    """Worker processes for decoding: one fewer than the cores, at least one, at most four."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def iterate(dataset: ConceptDataset, *, batch_size: int, workers: int, image: bool, labels: bool,
            skip_bad: bool, pin_memory: bool = False, indices: Sequence[int] | None = None) -> Iterator[Batch]:
    """Yield batches in dataset order (or of the dataset ``indices``, in their order). A sample that
    fails to load stops the run with its message, unless ``skip_bad`` is set, when it is skipped,
    logged and reported in ``Batch.failures``."""
    loader = DataLoader(
        _Parts(dataset, image, labels),
        batch_size=batch_size,
        shuffle=False,
        sampler=None if indices is None else [int(i) for i in indices],
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
    for batch in loader:
        if batch.failures and not skip_bad:
            raise DissectionError(f"{batch.failures[0]} (pass --skip-bad to skip unreadable samples)")
        for message in batch.failures:
            log.warning("skipped: %s", message)
        yield batch
