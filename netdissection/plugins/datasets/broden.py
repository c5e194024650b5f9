"""The Broden concept dataset, read exactly as it lies on disk.

Layout: ``index.csv`` (one row per image: ``image,split,ih,iw,sh,sw,<category>...``), ``label.csv``,
``category.csv``, ``c_<category>.csv`` and ``images/``. Pixel-level cells list ``;``-separated label
PNGs (label number = R + 256·G); image-level cells list ``;``-separated label numbers.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...core.errors import DissectionError, refuse_options
from ...core.hookspecs import hookimpl
from ...core.types import Concept, Sample, Vocabulary, select_categories

log = logging.getLogger(__name__)

INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")


@dataclass(frozen=True)
class Row:
    """One line of index.csv, parsed."""

    image: str
    image_size: tuple[int, int]
    label_size: tuple[int, int]
    pixel_files: tuple[str, ...]  # label PNGs of the selected pixel-level categories
    image_labels: tuple[int, ...]  # label numbers of the selected image-level categories


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DissectionError(f"{path} is missing; a Broden dataset has index.csv, label.csv, category.csv "
                              "and c_<category>.csv files")
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_categories(root: Path) -> list[str]:
    """Category names in category.csv order."""
    rows = _read_csv(root / "category.csv")
    if not rows or "name" not in rows[0]:
        raise DissectionError(f"{root / 'category.csv'} has no 'name' column")
    return [r["name"] for r in rows]


def read_vocabulary(root: Path, categories: Sequence[str]) -> Vocabulary:
    """Concepts of the selected categories; each label's primary category is the one with the
    largest coverage in the ``c_<category>.csv`` files (ties: the later category)."""
    names = {int(r["number"]): r["name"] for r in _read_csv(root / "label.csv")}
    coverage: dict[int, dict[str, float]] = {}
    for category in categories:
        for r in _read_csv(root / f"c_{category}.csv"):
            try:
                number, cov = int(r["number"]), float(r["coverage"])
            except (KeyError, ValueError):
                raise DissectionError(f"{root / f'c_{category}.csv'}: malformed row {r}") from None
            coverage.setdefault(number, {})[category] = cov
    concepts = []
    for number in sorted(coverage):
        if number == 0:
            continue
        by_cat = coverage[number]
        primary = max(categories, key=lambda c: (by_cat.get(c, -1.0), categories.index(c)))
        members = tuple(c for c in categories if c in by_cat)
        concepts.append(Concept(number, names.get(number, f"label{number}"), primary, members))
    return Vocabulary(tuple(categories), tuple(concepts))


def _int(value: str, what: str, line: int, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DissectionError(f"{path} line {line}: {what} is {value!r}, not an integer") from None


def read_index(root: Path, categories: Sequence[str], pixel_categories: set[str]) -> list[Row]:
    path = root / "index.csv"
    if not path.is_file():
        raise DissectionError(f"{root} is not a Broden dataset: it has no index.csv")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (*INDEX_FIXED, *categories) if c not in header]
        if missing:
            raise DissectionError(f"{path} is malformed: its header lacks the column(s) {', '.join(missing)}")
        rows = []
        for line, r in enumerate(reader, start=2):
            if None in r or any(v is None for v in r.values()):
                raise DissectionError(f"{path} line {line}: expected {len(header)} fields")
            pixel: list[str] = []
            levels: list[int] = []
            for c in categories:
                cell = r[c].strip()
                if not cell:
                    continue
                parts = [p for p in cell.split(";") if p]
                if c in pixel_categories:
                    pixel.extend(parts)
                else:
                    levels.extend(_int(p, f"the {c} label", line, path) for p in parts)
            rows.append(Row(
                image=r["image"],
                image_size=(_int(r["ih"], "ih", line, path), _int(r["iw"], "iw", line, path)),
                label_size=(_int(r["sh"], "sh", line, path), _int(r["sw"], "sw", line, path)),
                pixel_files=tuple(pixel),
                image_labels=tuple(levels),
            ))
    return rows


def _pixel_level(root: Path, categories: Sequence[str]) -> set[str]:
    """Which categories hold PNG names (pixel level) rather than label numbers (image level).

    Broden says so only through its cells, so look at the first non-empty cell of each column.
    """
    found: set[str] = set()
    undecided = set(categories)
    with (root / "index.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            for c in list(undecided):
                cell = (r.get(c) or "").strip()
                if cell:
                    undecided.discard(c)
                    if not cell.split(";")[0].strip().isdigit():
                        found.add(c)
            if not undecided:
                break
    return found


def _decode_problem(exc: Exception, path: Path) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image file"
    return str(exc).replace(str(path), "").strip(" :'") or type(exc).__name__


def _read_rgb(path: Path, what: str, expected: tuple[int, int] | None) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)``, with one-line errors naming the file ("what" it is)."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DissectionError(f"{what} {path} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DissectionError(f"{what} {path} is corrupt: {_decode_problem(exc, path)}") from None
    if expected is not None and rgb.shape[:2] != expected:
        raise DissectionError(f"{what} {path} is {rgb.shape[0]}×{rgb.shape[1]} (h×w) but index.csv says "
                              f"{expected[0]}×{expected[1]}")
    return rgb


def decode_label_png(path: Path, expected: tuple[int, int]) -> np.ndarray:
    """A Broden label PNG → ``(sh, sw)`` int32 label numbers (R + 256·G)."""
    rgb = _read_rgb(path, "label image", expected)
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def decode_image(path: Path, expected: tuple[int, int] | None = None) -> np.ndarray:
    """An image file → RGB uint8 ``(H, W, 3)``."""
    return _read_rgb(path, "image", expected)


class BrodenDataset:
    """A Broden-format folder. ``categories`` selects and orders categories (default: category.csv)."""

    format = "broden"

    def __init__(self, path: str | Path, categories: Sequence[str] | None = None, **options: Any) -> None:
        refuse_options(options, "a Broden dataset")
        root = Path(path).expanduser()
        if not root.exists():
            raise DissectionError(f"dataset folder {root} does not exist; pass --dataset with a Broden folder "
                                  "(or leave it out to use the built-in concept set)")
        if not root.is_dir():
            raise DissectionError(f"dataset {root} is not a folder")
        if not (root / "index.csv").is_file():
            raise DissectionError(f"{root} is not a Broden dataset: it has no index.csv")
        self.root = root
        available = read_categories(root)
        self.categories = select_categories(available, categories)
        self.vocabulary = read_vocabulary(root, self.categories)
        self.rows = read_index(root, self.categories, _pixel_level(root, self.categories))

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Sample:
        row = self.rows[index]
        images_dir = self.root / "images"
        rgb = decode_image(images_dir / row.image, row.image_size) if image else None
        layers = None
        if labels:
            layers = np.zeros((len(row.pixel_files), *row.label_size), dtype=np.int32)
            for k, name in enumerate(row.pixel_files):
                layers[k] = decode_label_png(images_dir / name, row.label_size)
        return Sample(index=index, image=rgb, layers=layers, image_labels=row.image_labels,
                      label_shape=row.label_size)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.rows[index].image

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.root.resolve()), "images": len(self.rows),
                "categories": list(self.categories), "concepts": len(self.vocabulary.concepts)}


def is_broden(path: Any) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / "index.csv").is_file() and (p / "category.csv").is_file()


@hookimpl
def dissect_register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    register("broden", BrodenDataset, description="Broden-format folder (index.csv, label.csv, c_*.csv, images/)",
             detect=is_broden)
