"""A generated concept set with Broden's label statistics, for the benchmarks ("Broden-hard").

    python benchmarks/broden_hard.py OUT --images 2000          # write one (224 px images, labels 112 px)
    python benchmarks/broden_hard.py --stats PATH [PATH ...]    # the label statistics of any Broden folder

The built-in generated set (netdissection's default dataset) is made for tests: 31 concepts, a few large
shapes per image. Broden is harder on a dissection: 1,197 concepts in six categories, and per image about
3.4 label layers (index.csv entries: pixel label maps and image-level labels) carrying about 10 distinct
labels, at 112 px for 224 px images. The cost of the IoU pass grows with exactly these: label layers to
decode and unite, distinct labels to count against every unit, pixels covered by several labels. So the
benchmarks measure on a set generated to match them:

- the vocabulary has Broden's size and shape: 11 colors, 584 objects, 234 parts (179 of them also objects,
  as Broden's "wheel" or "door"), 32 materials, 468 scenes, 47 textures: 1,197 label numbers;
- images imitate Broden's sources: scenes as in ADE20K (objects, parts and parts of parts, a scene label),
  objects as in Pascal (objects and parts), surfaces as in OpenSurfaces (materials), textures as in DTD
  (a texture label); every image has a color layer, as in Broden;
- labels are drawn from long-tailed (Zipf) frequencies, so a few concepts are common and most are rare;
- images are regions of the label maps painted in a palette colour with shading, a texture and noise, so
  they are no easier to decode than photographs of the same size.

``--stats`` measures, through netdissection's own Broden reader, what the benchmarks print: label layers,
distinct labels, labelled pixels and labels per labelled pixel, per image. The generator is deterministic
in (images, size, seed), image by image.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from netdissection.plugins.datasets.broden_writer import staging, stems, write_csv
from netdissection.plugins.datasets.labelmaps import encode_broden_rgb

#: Bump when the output changes, so that cached sets of an older version are not reused.
VERSION = 1
#: Broden's category.csv order.
CATEGORIES = ("object", "part", "scene", "material", "texture", "color")
PIXEL_CATEGORIES = ("object", "part", "material", "color")
JPEG_QUALITY = 90

COLORS = {  # Broden's eleven color names, with a palette centre each
    "black-c": (22, 22, 22), "blue-c": (40, 80, 200), "brown-c": (110, 70, 35), "green-c": (50, 150, 60),
    "grey-c": (128, 128, 128), "orange-c": (235, 140, 30), "pink-c": (235, 130, 180), "purple-c": (120, 50, 160),
    "red-c": (200, 35, 35), "white-c": (235, 235, 235), "yellow-c": (230, 215, 50),
}
COUNTS = {"object": 584, "part": 234, "material": 32, "scene": 468, "texture": 47}
SHARED_PARTS = 179  # part labels that are object labels too
#: Image kinds (Broden's sources) and how often each occurs.
KINDS = {"scene": 0.5, "object": 0.15, "surface": 0.28, "texture": 0.07}


@dataclass(frozen=True)
class Vocabulary:
    """Label numbers per category (a number may be in two categories) and every label's name."""

    names: dict[int, str]
    members: dict[str, tuple[int, ...]]


def vocabulary() -> Vocabulary:
    names: dict[int, str] = {}
    members: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    number = 0

    def add(category: str, name: str) -> None:
        nonlocal number
        number += 1
        names[number] = name
        members[category].append(number)

    for name in COLORS:
        add("color", name)
    for i in range(COUNTS["object"]):
        add("object", f"object{i + 1}")
    # Shared labels are mid-frequency objects (Broden's parts are things like wheel, door, window, leg).
    members["part"].extend(members["object"][20:20 + SHARED_PARTS])
    for i in range(COUNTS["part"] - SHARED_PARTS):
        add("part", f"part{i + 1}")
    for i in range(COUNTS["material"]):
        add("material", f"material{i + 1}")
    for i in range(COUNTS["scene"]):
        add("scene", f"scene{i + 1}-s")
    for i in range(COUNTS["texture"]):
        add("texture", f"texture{i + 1}")
    return Vocabulary(names, {c: tuple(v) for c, v in members.items()})


class Zipf:
    """Draws from a category's labels with probability ∝ 1 / rank (rank = position in the category)."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        weights = 1.0 / np.arange(1, len(labels) + 1)
        self.cdf = np.cumsum(weights) / weights.sum()

    def __call__(self, rng: np.random.Generator, size: int) -> np.ndarray:
        picks = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.labels[np.minimum(picks, len(self.labels) - 1)]


# ------------------------------------------------------------------------------------------- one image


@dataclass
class Rendered:
    """An image, its label layers by category (label resolution) and its image-level labels."""

    rgb: np.ndarray
    layers: dict[str, list[np.ndarray]] = field(default_factory=dict)
    image_labels: dict[str, int] = field(default_factory=dict)


def _coords(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return c[:, None], c[None, :]  # rows, columns


def _cells(rng: np.random.Generator, k: int, grids: Sequence[tuple[np.ndarray, np.ndarray]],
           within: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """A power diagram of ``k`` random seeds with stretched distances: organic regions, at each resolution.
    With ``within`` (a mask per resolution), seeds lie inside the mask and cells are cut to it (-1 outside)."""
    if within is not None:
        rows, cols = np.nonzero(within[-1])
        if rows.size == 0:
            return [np.full(m.shape, -1, dtype=np.int16) for m in within]
        pick = rng.integers(rows.size, size=k)
        n = within[-1].shape[0]
        seeds = np.stack([(rows[pick] + 0.5) / n, (cols[pick] + 0.5) / n], axis=1).astype(np.float32)
    else:
        seeds = rng.random((k, 2), dtype=np.float32)
    stretch = rng.uniform(0.5, 2.0, size=(k, 2)).astype(np.float32)
    power = rng.uniform(0.0, 0.02, size=k).astype(np.float32)
    out = []
    for g, (y, x) in enumerate(grids):
        d = ((y[None] - seeds[:, 0, None, None]) ** 2 * stretch[:, 0, None, None]
             + (x[None] - seeds[:, 1, None, None]) ** 2 * stretch[:, 1, None, None] - power[:, None, None])
        cells = np.argmin(d, axis=0).astype(np.int16)
        if within is not None:
            cells[~within[g]] = -1
        out.append(cells)
    return out


class Painter:
    """Paints an image region by region: a palette colour, a shading gradient, a texture, noise."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        self.rng, self.n = rng, n
        self.rgb = np.zeros((n, n, 3), dtype=np.float32)
        y, x = _coords(n)
        self.y, self.x = y, x

    def fill(self, mask: np.ndarray, colour: str) -> None:
        rng = self.rng
        base = np.asarray(COLORS[colour], dtype=np.float32) + rng.integers(-10, 11, size=3)
        gy, gx, amp = rng.uniform(-25, 25), rng.uniform(-25, 25), rng.uniform(0, 18)
        fy, fx = rng.uniform(4, 40, size=2)
        ripple = np.sin(fy * self.y * 6.28) * np.sin(fx * self.x * 6.28)
        shade = gy * (self.y - 0.5) + gx * (self.x - 0.5) + amp * ripple
        self.rgb[mask] = base + shade[mask][:, None]

    def finish(self) -> np.ndarray:
        noise = self.rng.integers(-9, 10, size=self.rgb.shape, dtype=np.int8)
        return np.clip(np.rint(self.rgb + noise), 0, 255).astype(np.uint8)


def _kind(rng: np.random.Generator) -> str:
    return str(rng.choice(list(KINDS), p=list(KINDS.values())))


def render(i: int, size: int, seed: int, vocab: Vocabulary, zipf: dict[str, Zipf]) -> Rendered:
    """Image ``i`` of the set (one generator per image: image i does not depend on the set's size)."""
    rng = np.random.default_rng([seed, i])
    n, m = size, max(1, size // 2)
    grids = (_coords(n), _coords(m))
    painter = Painter(rng, n)
    out = Rendered(rgb=np.zeros(0))
    colors = vocab.members["color"]
    colour_names = list(COLORS)
    color_layer = np.zeros((m, m), dtype=np.int32)
    palette = rng.choice(len(colors), size=int(rng.integers(2, 5)), replace=False)  # a photo's few colours

    def paint(masks: Sequence[np.ndarray]) -> None:
        c = int(rng.choice(palette))
        painter.fill(masks[0], colour_names[c])
        color_layer[masks[1]] = colors[c]

    kind = _kind(rng)
    if kind == "texture":
        period = rng.uniform(0.06, 0.2)
        angle = rng.uniform(0, np.pi)
        marks = [np.floor((y * np.cos(angle) + x * np.sin(angle)) / period) % 2 == 1 for y, x in grids]
        paint([~marks[0], ~marks[1]])
        paint(marks)
        out.image_labels["texture"] = int(zipf["texture"](rng, 1)[0])
    else:
        k = int(rng.integers(*{"scene": (4, 9), "object": (3, 6), "surface": (3, 7)}[kind]))
        regions = _cells(rng, k, grids)
        category = "material" if kind == "surface" else "object"
        layer = np.zeros((m, m), dtype=np.int32)
        labels = zipf[category](rng, k)
        labelled = rng.random(k) < (0.8 if kind == "surface" else 0.95)
        parts = [np.zeros((m, m), dtype=np.int32) for _ in range(2)]
        for r in range(k):
            masks = [regions[0] == r, regions[1] == r]
            paint(masks)
            if labelled[r]:
                layer[masks[1]] = labels[r]
            if kind == "surface" or rng.random() > (0.35 if kind == "scene" else 0.45):
                continue
            sub = _cells(rng, int(rng.integers(2, 4)), grids, within=masks)
            for s, label in enumerate(zipf["part"](rng, int(sub[1].max()) + 1)):
                part = [sub[0] == s, sub[1] == s]
                if rng.random() < 0.5:
                    paint(part)
                parts[0][part[1]] = label
                if kind == "scene" and rng.random() < 0.5:  # a part of this part (ADE's second part level)
                    inner = _cells(rng, 2, grids, within=part)
                    parts[1][inner[1] == 0] = zipf["part"](rng, 1)[0]
        out.layers[category] = [layer]
        kept = [p for p in parts if p.any()]
        if kept:
            out.layers["part"] = kept
        if kind == "scene":
            out.image_labels["scene"] = int(zipf["scene"](rng, 1)[0])
    out.layers["color"] = [color_layer]
    out.rgb = painter.finish()
    return out


# ----------------------------------------------------------------------------------------------- the set


class Tally:
    """Per category and label: images it occurs in and coverage (summed fraction of the label map)."""

    def __init__(self, size: int) -> None:
        self.frequency = {c: np.zeros(size, dtype=np.int64) for c in CATEGORIES}
        self.coverage = {c: np.zeros(size, dtype=np.float64) for c in CATEGORIES}
        self.images = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, stack: Sequence[np.ndarray] | None, level: int | None, area: int) -> None:
        self.images[category] += 1
        if level is not None:
            self.frequency[category][level] += 1
            self.coverage[category][level] += 1.0
            return
        assert stack is not None
        layers = np.stack(stack)
        for label in np.unique(layers):
            if label:  # a pixel counts once for a label, however many of the layers give it
                self.frequency[category][label] += 1
                self.coverage[category][label] += np.any(layers == label, axis=0).sum() / area


def generate(root: Path, *, images: int, size: int = 224, seed: int = 0) -> Path:
    """Write the set into ``root`` (which must not exist, or be empty); returns ``root``."""
    vocab = vocabulary()
    zipf = {c: Zipf(labels) for c, labels in vocab.members.items()}
    top = max(vocab.names) + 1
    tally = Tally(top)
    m = max(1, size // 2)
    rows = []
    with staging(root) as tmp:
        (tmp / "images").mkdir()
        for i, stem in enumerate(stems(images)):
            item = render(i, size, seed, vocab, zipf)
            buffer = io.BytesIO()
            Image.fromarray(item.rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
            (tmp / "images" / f"{stem}.jpg").write_bytes(buffer.getvalue())
            cells = dict.fromkeys(CATEGORIES, "")
            for category, stack in item.layers.items():
                names = [f"{stem}_{category}_{k + 1}.png" for k in range(len(stack))]
                for name, layer in zip(names, stack, strict=True):
                    (tmp / "images" / name).write_bytes(encode_broden_rgb(layer))
                cells[category] = ";".join(names)
                tally.add(category, stack, None, m * m)
            for category, label in item.image_labels.items():
                cells[category] = str(label)
                tally.add(category, None, label, m * m)
            rows.append([f"{stem}.jpg", "train", size, size, m, m, *(cells[c] for c in CATEGORIES)])
        _write_tables(tmp, vocab, tally, rows)
        (tmp / "README.txt").write_text(
            f"Broden-hard concept set (netdissection benchmarks, version {VERSION}): images={images} "
            f"image_size={size} seed={seed}. Broden format; label maps are half size.\n", encoding="utf-8")
    return root


def _write_tables(root: Path, vocab: Vocabulary, tally: Tally, rows: list[list[object]]) -> None:
    def cov(value: float) -> str:
        return f"{value:.6f}"  # fixed point: NetDissect-Lite's reader takes only digits.digits as a float

    label_rows = []
    for number, name in sorted(vocab.names.items()):
        cats = [c for c in CATEGORIES if number in vocab.members[c]]
        seen = [c for c in cats if tally.frequency[c][number]] or cats[:1]
        label_rows.append([number, name, ";".join(f"{c}({tally.frequency[c][number]})" for c in seen),
                           sum(int(tally.frequency[c][number]) for c in cats),
                           cov(sum(tally.coverage[c][number] for c in cats)), ""])
    write_csv(root / "label.csv", ("number", "name", "category", "frequency", "coverage", "syns"), label_rows)
    for c in CATEGORIES:
        write_csv(root / f"c_{c}.csv", ("code", "number", "name", "frequency", "coverage"),
                  [[code, n, vocab.names[n], int(tally.frequency[c][n]), cov(tally.coverage[c][n])]
                   for code, n in enumerate(vocab.members[c], start=1)])
    write_csv(root / "category.csv", ("name", "first", "last", "count", "frequency"),
              [[c, 1, len(vocab.members[c]), len(vocab.members[c]), tally.images[c]] for c in CATEGORIES])
    # index.csv last: it is what marks a folder as a Broden dataset.
    write_csv(root / "index.csv", ("image", "split", "ih", "iw", "sh", "sw", *CATEGORIES), rows)


def cached(images: int, size: int = 224, seed: int = 0) -> Path:
    """The set of these parameters in the temp folder, generated on first use."""
    root = Path(tempfile.gettempdir()) / f"netdissection-bench-broden-hard-v{VERSION}-{images}-{size}-s{seed}"
    if not (root / "index.csv").is_file():
        generate(root, images=images, size=size, seed=seed)
    return root


# -------------------------------------------------------------------------------------------- statistics


def statistics(path: Path) -> dict[str, float]:
    """Per-image label statistics of a Broden folder, read through netdissection's Broden reader.

    ``layers``: index.csv entries per image (pixel label maps plus image-level labels); ``distinct``: distinct
    labels per image; ``labelled``: fraction of label pixels with at least one label; ``depth``: labels per
    labelled pixel; ``concepts``: the vocabulary; ``jpeg_kb``: mean image file size.
    """
    from netdissection.plugins.datasets.broden import BrodenDataset

    dataset = BrodenDataset(path)
    layers, distinct, labelled, depth, jpeg = [], [], [], [], []
    for i in range(len(dataset)):
        sample = dataset.load(i, image=False, labels=True)
        assert sample.layers is not None
        levels = [label for label in sample.image_labels if label]
        layers.append(sample.layers.shape[0] + len(levels))
        distinct.append(len(set(np.unique(sample.layers).tolist()) - {0} | set(levels)))
        per_pixel = (sample.layers != 0).sum(axis=0) + len(levels)
        labelled.append(float((per_pixel > 0).mean()))
        depth.append(float(per_pixel[per_pixel > 0].mean()) if (per_pixel > 0).any() else 0.0)
        jpeg.append(dataset.image_path(i).stat().st_size / 1e3)
    sh = sample.label_shape[0]
    return {"images": len(dataset), "concepts": len(dataset.vocabulary.concepts), "layers": float(np.mean(layers)),
            "distinct": float(np.mean(distinct)), "labelled": float(np.mean(labelled)), "depth": float(np.mean(depth)),
            "label_px": float(sh), "jpeg_kb": float(np.mean(jpeg))}


def cached_statistics(path: Path) -> dict[str, float]:
    """:func:`statistics`, kept beside a benchmark set (it is read once, not at every benchmark)."""
    saved = path / "statistics.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    stats = statistics(path)
    saved.write_text(json.dumps(stats))
    return stats


def describe(stats: dict[str, float]) -> str:
    return (f"{stats['images']:.0f} images, {stats['concepts']:.0f} concepts; per image {stats['layers']:.2f} "
            f"label layers, {stats['distinct']:.1f} distinct labels, {100 * stats['labelled']:.0f}% of pixels "
            f"labelled, {stats['depth']:.2f} labels per labelled pixel; labels {stats['label_px']:.0f} px; "
            f"JPEG {stats['jpeg_kb']:.1f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="folder to write the set into")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", type=Path, nargs="+", metavar="PATH", help="print the statistics of these sets")
    args = parser.parse_args()
    if args.out is not None:
        generate(args.out, images=args.images, size=args.size, seed=args.seed)
        print(f"{args.out}: {describe(statistics(args.out))}")
    for path in args.stats or []:
        print(f"{path}: {describe(statistics(path))}")
    if args.out is None and not args.stats:
        parser.error("give an output folder or --stats PATH")


if __name__ == "__main__":
    main()
