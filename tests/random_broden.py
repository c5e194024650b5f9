"""A Broden-format folder with random labels, built to hit every corner of the bookkeeping:
labels in several categories, two part layers that repeat a label at the same pixel, images
missing categories, image-level labels, and a label that is both image-level and pixel-level."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ["object", "color", "material", "scene", "texture", "part"]
PIXEL = {"object", "color", "material", "part"}
# label number: (name, categories it may occur in)
LABELS = {
    1: ("red-c", ["color"]), 2: ("green-c", ["color"]), 3: ("blue-c", ["color"]),
    4: ("car", ["object"]), 5: ("wheel", ["object", "part"]), 6: ("tree", ["object"]),
    7: ("window", ["part", "object"]), 8: ("hub", ["part"]),
    9: ("metal", ["material"]), 10: ("wood", ["material", "object"]),
    11: ("beach-s", ["scene"]), 12: ("street-s", ["scene"]),
    13: ("striped", ["texture"]), 14: ("dotted", ["texture", "scene", "material"]),
}


def _png(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb).save(path)


def _blobs(rng: np.random.Generator, shape: tuple[int, int], choices: list[int], p_empty: float) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    for _ in range(rng.integers(1, 4)):
        y0, x0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        y1, x1 = y0 + rng.integers(1, shape[0]), x0 + rng.integers(1, shape[1])
        out[y0:y1, x0:x1] = rng.choice(choices)
    out[rng.random(shape) < p_empty] = 0
    return out


def write_random_broden(root: Path, images: int = 16, image_size: int = 16, label_size: int = 8,
                        seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    shape = (label_size, label_size)
    rows = []
    freq = {c: {} for c in CATEGORIES}
    cover = {c: {} for c in CATEGORIES}

    def count(cat: str, labels: np.ndarray | int) -> None:
        if isinstance(labels, int):
            freq[cat][labels] = freq[cat].get(labels, 0) + 1
            cover[cat][labels] = cover[cat].get(labels, 0.0) + 1.0
            return
        for label in np.unique(labels):
            if label:
                freq[cat][int(label)] = freq[cat].get(int(label), 0) + 1
                cover[cat][int(label)] = cover[cat].get(int(label), 0.0) + float((labels == label).mean())

    for i in range(images):
        name = f"img{i:03d}"
        image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        row = {"image": f"{name}.png", "split": "train", "ih": image_size, "iw": image_size,
               "sh": label_size, "sw": label_size}
        for c in CATEGORIES:
            row[c] = ""
        if i % 5 != 4:  # every fifth image has no color annotation
            colors = rng.integers(1, 4, shape)
            _png(root / "images" / f"{name}_color.png", colors)
            row["color"] = f"{name}_color.png"
            count("color", colors)
        if i % 3 != 2:
            obj = _blobs(rng, shape, [4, 5, 6, 7, 10], 0.2)
            _png(root / "images" / f"{name}_object.png", obj)
            row["object"] = f"{name}_object.png"
            count("object", obj)
            part1 = _blobs(rng, shape, [5, 7, 8], 0.3)
            part2 = part1.copy()  # the second layer repeats some labels of the first at the same pixels
            part2[rng.random(shape) < 0.5] = 8
            part2[rng.random(shape) < 0.3] = 0
            _png(root / "images" / f"{name}_part_1.png", part1)
            _png(root / "images" / f"{name}_part_2.png", part2)
            row["part"] = f"{name}_part_1.png;{name}_part_2.png"
            count("part", part1)
            count("part", part2)
            if i % 2 == 0:
                mat = _blobs(rng, shape, [9, 10, 14], 0.4)
                _png(root / "images" / f"{name}_material.png", mat)
                row["material"] = f"{name}_material.png"
                count("material", mat)
        if i % 4 == 0:
            scene = int(rng.choice([11, 12, 14]))
            row["scene"] = str(scene)
            count("scene", scene)
        if i % 4 == 1:
            texture = int(rng.choice([13, 14]))
            row["texture"] = str(texture) if i % 8 != 1 else f"{texture};13"
            count("texture", texture)
        rows.append(row)

    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
        writer.writeheader()
        writer.writerows(rows)
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        w.writerow([0, "-", "-", 0, 0.0, ""])
        for number, (label, cats) in LABELS.items():
            present = [c for c in cats if number in freq[c]]
            w.writerow([number, label, ";".join(f"{c}({freq[c][number]})" for c in present),
                        sum(freq[c][number] for c in present), sum(cover[c][number] for c in present), ""])
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for c in CATEGORIES:
            w.writerow([c, 1, len(freq[c]), len(freq[c]), sum(freq[c].values())])
    for c in CATEGORIES:
        with open(root / f"c_{c}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, number in enumerate(sorted(freq[c]), start=1):
                w.writerow([code, number, LABELS[number][0], freq[c][number], cover[c][number]])
    return root
