"""Runs for the report tests: a real small dissection, and a synthetic 512-unit layer over a generated set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netdissection.core.types import LayerResult, RunResult, TopImages
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.generated import generate_concept_set


@dataclass(frozen=True)
class SmallRun:
    """A finished dissection of resnet18 layer2 and layer3 (seeded weights) on 12 generated 64 px images."""

    result: RunResult
    out: Path
    dataset: Path


def dissect_small(root: Path) -> SmallRun:
    import torch
    import torchvision

    import netdissection

    dataset = generate_concept_set(root / "set", images=12, image_size=64, seed=0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    result = netdissection.dissect(model, dataset=str(dataset), out=root / "out", layers=["layer2", "layer3"],
                                   workers=0)
    return SmallRun(result, root / "out", dataset)


def synthetic_run(dataset_root: Path, *, units: int = 512, k: int = 10, map_size: int = 7,
                  seed: int = 0) -> RunResult:
    """A one-layer run with made-up counts (about 40% detectors) and top images over a generated set.

    No model runs: the report writers see exactly what a real run hands them, at the size that matters.
    """
    rng = np.random.default_rng(seed)
    dataset = BrodenDataset(dataset_root)
    vocab = dataset.vocabulary
    labels = np.array([c.number for c in vocab.concepts])
    size, cats = vocab.size, len(vocab.categories)
    area = 4000
    truth = np.zeros(size, dtype=np.int64)
    truth[labels] = area
    activation = np.full((units, cats), area, dtype=np.int64)
    intersection = np.zeros((units, size), dtype=np.int64)
    intersection[:, labels] = rng.integers(0, 150, size=(units, labels.size))  # IoU below ~0.02
    for u in np.flatnonzero(rng.random(units) < 0.4):
        iou = rng.uniform(0.04, 0.3)
        # I / (A + G - I) = iou with A = G = area  =>  I = 2·area·iou / (1 + iou)
        intersection[u, rng.choice(labels)] = int(np.ceil(2 * area * iou / (1 + iou)))
    indices = np.stack([rng.choice(len(dataset), size=k, replace=False) for _ in range(units)])
    # Smooth blobs plus a little noise, like a unit's activation maps: each mask is a blob or two.
    grid = np.arange(map_size, dtype=np.float64)
    centre = rng.uniform(0, map_size - 1, size=(units, k, 2, 1, 1))
    width = rng.uniform(0.6, 1.6, size=(units, k, 1, 1))
    distance = (grid[:, None] - centre[:, :, 0]) ** 2 + (grid[None, :] - centre[:, :, 1]) ** 2
    maps = (rng.uniform(2, 6, size=(units, k, 1, 1)) * np.exp(-distance / (2 * width**2))
            + rng.gamma(1.0, 0.2, size=(units, k, map_size, map_size))).astype(np.float32)
    order = np.argsort(-maps.max(axis=(2, 3)), axis=1, kind="stable")  # slots by descending peak
    maps = np.take_along_axis(maps, order[:, :, None, None], axis=1)
    scores = maps.max(axis=(2, 3)).astype(np.float64)
    thresholds = np.quantile(maps.reshape(units, -1), 0.85, axis=1)
    layer = LayerResult(layer="layer4", vocabulary=vocab, thresholds=thresholds, intersection=intersection,
                        truth=truth, activation=activation,
                        top_images=TopImages(indices.astype(np.int64), scores, maps))
    provenance = {"netdissection": "test", "model": "synthetic-512", "backend": "none",
                  "dataset": dataset.describe(), "layers": ["layer4"],
                  "threshold_rule": {"name": "quantile", "q": 0.005, "compat": "paper"}, "semantics": "paper"}
    return RunResult(layers={"layer4": layer}, provenance=provenance, images=len(dataset), dataset=dataset)


def generated_set(root: Path, images: int, image_size: int) -> Path:
    return generate_concept_set(root, images=images, image_size=image_size, seed=0)
