"""The protocol written out plainly in numpy, loop by loop: the independent reference for the fast path.

Nothing here is shared with the package: the label files are read with Pillow, the CSVs with the
csv module, and upsampling is written from its definition.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def bilinear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear upsampling with half-pixel centres and clamped edges (align_corners=False), float64."""
    h, w = a.shape
    out = np.zeros((out_h, out_w), dtype=np.float64)
    for y in range(out_h):
        sy = max((y + 0.5) * h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1 = min(y0 + 1, h - 1)
        ly = sy - y0 if y1 != y0 else 0.0  # a clamped edge pixel is exactly the edge value
        for x in range(out_w):
            sx = max((x + 0.5) * w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1 = min(x0 + 1, w - 1)
            lx = sx - x0 if x1 != x0 else 0.0
            out[y, x] = ((1 - ly) * ((1 - lx) * a[y0, x0] + lx * a[y0, x1])
                         + ly * ((1 - lx) * a[y1, x0] + lx * a[y1, x1]))
    return out


@dataclass
class BruteDataset:
    """A Broden folder read the simple way."""

    categories: list[str]
    pcat: dict[int, str]  # label number -> primary category
    names: dict[int, str]
    layers: list[list[np.ndarray]]  # per image, its pixel label layers
    image_labels: list[list[int]]
    label_shapes: list[tuple[int, int]]
    images: list[np.ndarray]


def read_broden(root: Path, categories: list[str] | None = None) -> BruteDataset:
    with open(root / "category.csv") as f:
        all_cats = [r["name"] for r in csv.DictReader(f)]
    cats = [c for c in all_cats if categories is None or c in categories]
    coverage: dict[int, dict[str, float]] = {}
    for c in cats:
        with open(root / f"c_{c}.csv") as f:
            for r in csv.DictReader(f):
                coverage.setdefault(int(r["number"]), {})[c] = float(r["coverage"])
    pcat = {}
    for number, by_cat in coverage.items():
        if number == 0:
            continue
        best = None
        for c in cats:  # later category wins ties: compare with >=
            if c in by_cat and (best is None or by_cat[c] >= by_cat[best]):
                best = c
        pcat[number] = best
    with open(root / "label.csv") as f:
        names = {int(r["number"]): r["name"] for r in csv.DictReader(f)}
    layers, levels, shapes, images = [], [], [], []
    with open(root / "index.csv") as f:
        for r in csv.DictReader(f):
            sh, sw = int(r["sh"]), int(r["sw"])
            img_layers, img_levels = [], []
            for c in cats:
                for part in filter(None, r[c].split(";")):
                    if part.isdigit():
                        img_levels.append(int(part))
                    else:
                        rgb = np.asarray(Image.open(root / "images" / part).convert("RGB")).astype(np.int64)
                        img_layers.append(rgb[..., 0] + 256 * rgb[..., 1])
            layers.append(img_layers)
            levels.append(img_levels)
            shapes.append((sh, sw))
            images.append(np.asarray(Image.open(root / "images" / r["image"]).convert("RGB")))
    return BruteDataset(cats, pcat, names, layers, levels, shapes, images)


def categories_present(data: BruteDataset) -> list[set[str]]:
    """Per image, the primary categories of the labels it has (pixel or image level)."""
    present = []
    for layers, levels in zip(data.layers, data.image_labels, strict=True):
        labels = {int(v) for layer in layers for v in np.unique(layer)} | set(levels)
        present.append({data.pcat[v] for v in labels if v in data.pcat})
    return present


@dataclass
class BruteResult:
    thresholds: np.ndarray
    intersection: dict[tuple[int, int], int]
    truth: dict[int, int]
    activation: dict[tuple[int, str], int]
    iou: dict[tuple[int, int], float]
    has_category: list[set[str]]


def dissect(acts: list[np.ndarray], data: BruteDataset, q: float = 0.005, lite: bool = False,
            thresholds: np.ndarray | None = None) -> BruteResult:
    """``acts``: per image, the raw ``(units, h, w)`` float32 maps; ``thresholds``: given (e.g. a whole
    run's, to count a subset of its images), else computed from ``acts``."""
    units = acts[0].shape[0]
    if thresholds is None:
        all_values = np.stack(acts).astype(np.float64)
        thresholds = np.zeros(units)
        for u in range(units):
            values = all_values[:, u].ravel()
            if lite:
                thresholds[u] = np.quantile(values, (int(1000 * (1 - q)) - 1) / 999, method="hazen")
            else:
                thresholds[u] = np.quantile(values, 1 - q)
    inter: dict[tuple[int, int], int] = {}
    truth: dict[int, int] = {}
    act: dict[tuple[int, str], int] = {}
    has_category = []
    for x, maps in enumerate(acts):
        sh, sw = data.label_shapes[x]
        # The label sets of this image: pixel counts per label (union, or summed for lite).
        masks: dict[int, np.ndarray] = {}
        for layer in data.layers[x]:
            for label in np.unique(layer):
                if label == 0 or label not in data.pcat:
                    continue
                hit = (layer == label).astype(np.int64)
                if lite:
                    masks[label] = masks.get(label, 0) + hit
                else:
                    masks[label] = np.maximum(masks.get(label, 0), hit)
        for label in data.image_labels[x]:
            if label in data.pcat:
                full = np.ones((sh, sw), dtype=np.int64)
                masks[label] = masks.get(label, 0) + full if lite else full
        has = {data.pcat[label] for label in masks}
        has_category.append(has)
        for label, m in masks.items():
            truth[label] = truth.get(label, 0) + int(m.sum())
        for u in range(units):
            mask = bilinear(maps[u].astype(np.float64), sh, sw) > thresholds[u]
            area = int(mask.sum())
            under = set()
            for label, m in masks.items():
                count = int((m * mask).sum())
                inter[(u, label)] = inter.get((u, label), 0) + count
                if count > 0:
                    under.add(data.pcat[label])
            for c in (under if lite else has):
                act[(u, c)] = act.get((u, c), 0) + area
    iou = {}
    for u in range(units):
        for label, c in data.pcat.items():
            i = inter.get((u, label), 0)
            denominator = act.get((u, c), 0) + truth.get(label, 0) - i
            iou[(u, label)] = i / denominator if denominator > 0 else 0.0
    return BruteResult(thresholds, inter, truth, act, iou, has_category)
