"""A small hand-made folder-format concept set, with every label map encoding, for the dataset tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CONCEPTS = [(1, "sky", "object"), (2, "car", "object"), (3, "wheel", "part"), (300, "red", "color"),
            (5, "beach", "scene"), (6, "striped", "texture")]
IMAGE_SIZE = (8, 8)
LABEL_SIZE = (4, 4)


def label_maps() -> dict[str, np.ndarray]:
    """The label layers of the set by file name, as the ids they hold."""
    objects = np.zeros(LABEL_SIZE, dtype=np.int64)
    objects[:2] = 1
    objects[2:, 1:3] = 2
    parts = np.zeros(LABEL_SIZE, dtype=np.int64)
    parts[3, 1] = 3
    colours = np.zeros(LABEL_SIZE, dtype=np.int64)
    colours[2:, :] = 300
    mixed = np.zeros(LABEL_SIZE, dtype=np.int64)
    mixed[0, :] = 2
    mixed[1:, 2:] = 300
    return {"masks/0_objects.png": objects, "masks/0_parts.png": parts, "masks/0_colours.png": colours,
            "masks/1.png": mixed}


def write_png(path: Path, ids: np.ndarray, mode: str) -> None:
    """Write ids as a label PNG of the given encoding: L (8-bit), I;16, or Broden RGB."""
    if mode == "L":
        image = Image.fromarray(ids.astype(np.uint8))
    elif mode == "I;16":
        image = Image.fromarray(ids.astype(np.uint16))
    else:
        rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
        rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
        image = Image.fromarray(rgb)
    assert image.mode == mode
    image.save(path)


def write_csv(path: Path, rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def make_folder(root: Path, seed: int = 0) -> Path:
    """Three 8×8 images with 4×4 labels: image 0 has three layers (8-bit, Broden RGB, 16-bit) and a scene
    by name, image 1 one 16-bit layer and two image-level ids, image 2 only a texture."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    maps = label_maps()
    write_png(root / "masks/0_objects.png", maps["masks/0_objects.png"], "L")
    write_png(root / "masks/0_parts.png", maps["masks/0_parts.png"], "RGB")
    write_png(root / "masks/0_colours.png", maps["masks/0_colours.png"], "I;16")
    write_png(root / "masks/1.png", maps["masks/1.png"], "I;16")
    write_csv(root / "concepts.csv", [["id", "name", "category"], *[list(c) for c in CONCEPTS]])
    write_csv(root / "samples.csv", [
        ["image", "masks", "labels"],
        ["images/0.png", "masks/0_objects.png;masks/0_parts.png;masks/0_colours.png", "beach"],
        ["images/1.png", "masks/1.png", "5;6"],
        ["images/2.png", "", "striped"],
    ])
    return root
