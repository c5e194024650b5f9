"""The Broden concept dataset, read exactly as it lies on disk.

Layout: ``index.csv`` (one row per image: ``image,split,ih,iw,sh,sw,<category>...``), ``label.csv``,
``category.csv``, ``c_<category>.csv`` and ``images/``. Pixel-level cells list ``;``-separated label
PNGs (label number = R + 256·G); image-level cells list ``;``-separated label numbers.
"""

from __future__ import annotations

import csv
import logging
import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ...core.errors import DissectionError, first_line, refuse_options
from ...core.hookspecs import hookimpl
from ...core.limits import MAX_IMAGE_PIXELS, MAX_LABEL_PIXELS, check_pixels
from ...core.types import Concept, Sample, Vocabulary, select_categories
from .folder_dataset import CATEGORY_NAME
from .labelmaps import MAX_ID, decode_broden_labels, decode_rgb
from .paths import Confined, relative_problem

log = logging.getLogger(__name__)

INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")
#: The longest line index.csv may have: a row names a few files, never a megabyte of them. Reading a line
#: of a file without newlines would otherwise read the whole file into memory.
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class Row:
    """One line of index.csv, parsed."""

    image: str
    image_size: tuple[int, int]
    label_size: tuple[int, int]
    pixel_files: tuple[str, ...]  # label PNGs of the selected pixel-level categories
    image_labels: tuple[int, ...]  # label numbers of the selected image-level categories


def _table(path: Path) -> Iterator[tuple[int, dict[str, str | None]]]:
    """The rows of a small table (category.csv, label.csv, c_*.csv) with their line numbers, streamed;
    bytes that are no UTF-8 and broken CSV are one line naming the file."""
    if not path.is_file():
        raise DissectionError(f"{path} is missing; a Broden dataset has index.csv, label.csv, category.csv "
                              "and c_<category>.csv files")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row  # type: ignore[misc]
    except UnicodeDecodeError as exc:
        raise DissectionError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        # DictReader counts only the lines of rows it returned; its inner reader, the line it failed on.
        raise DissectionError(f"{path} line {reader.reader.line_num} is no CSV: {first_line(exc)}") from None


def _columns(path: Path, needed: Sequence[str]) -> None:
    """Refuse a table whose header lacks one of ``needed``."""
    if not path.is_file():
        return  # _table says so
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as exc:
        raise DissectionError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DissectionError(f"{path} line 1 is no CSV: {first_line(exc)}") from None
    missing = [c for c in needed if c not in header]
    if missing:
        raise DissectionError(f"{path} is malformed: its header lacks the column(s) {', '.join(missing)}")


def _cell(row: dict[str, str | None], column: str, path: Path, line: int) -> str:
    value = row.get(column)
    if value is None or None in row:
        raise DissectionError(f"{path} line {line}: the row does not have the header's number of fields")
    return value.strip()


def _number(value: str, what: str, path: Path, line: int, low: int = 0) -> int:
    """A label number: an integer in ``low``..MAX_ID (what a Broden label PNG can hold)."""
    try:
        number = int(value)
    except ValueError:
        raise DissectionError(f"{path} line {line}: {what} is {value!r}, not an integer") from None
    if not low <= number <= MAX_ID:
        raise DissectionError(f"{path} line {line}: {what} {number} is outside {low}..{MAX_ID}")
    return number


def read_categories(root: Path) -> list[str]:
    """Category names in category.csv order."""
    path = root / "category.csv"
    _columns(path, ("name",))
    names: dict[str, int] = {}
    for line, row in _table(path):
        name = _cell(row, "name", path, line)
        if not CATEGORY_NAME.match(name):
            raise DissectionError(f"{path} line {line}: {name!r} is not a category name (letters, digits, "
                                  "'_', '-' or '.'; it names the c_<category>.csv file)")
        if name in names:
            raise DissectionError(f"{path} line {line}: the category {name} is already on line {names[name]}")
        names[name] = line
    if not names:
        raise DissectionError(f"{path} lists no categories")
    return list(names)


def read_vocabulary(root: Path, categories: Sequence[str]) -> Vocabulary:
    """Concepts of the selected categories; each label's primary category is the one with the
    largest coverage in the ``c_<category>.csv`` files (ties: the later category)."""
    label_path = root / "label.csv"
    _columns(label_path, ("number", "name"))
    names: dict[int, str] = {}
    for line, row in _table(label_path):
        number = _number(_cell(row, "number", label_path, line), "the number", label_path, line)
        if number in names:
            raise DissectionError(f"{label_path} line {line}: the number {number} is listed twice")
        names[number] = _cell(row, "name", label_path, line)
    coverage: dict[int, dict[str, float]] = {}
    for category in categories:
        path = root / f"c_{category}.csv"
        _columns(path, ("number", "coverage"))
        for line, row in _table(path):
            number = _number(_cell(row, "number", path, line), "the number", path, line)
            text = _cell(row, "coverage", path, line)
            try:
                cov = float(text)
            except ValueError:
                cov = math.nan
            if not math.isfinite(cov) or cov < 0:
                raise DissectionError(f"{path} line {line}: the coverage {text!r} is not a number ≥ 0")
            coverage.setdefault(number, {})[category] = cov
    concepts = []
    for number in sorted(coverage):
        if number == 0:
            continue
        by_cat = coverage[number]
        primary = max(categories, key=lambda c: (by_cat.get(c, -1.0), categories.index(c)))
        members = tuple(c for c in categories if c in by_cat)
        concepts.append(Concept(number, names.get(number, f"label{number}"), primary, members))
    if not concepts:
        raise DissectionError(f"the c_<category>.csv files of {root} list no concepts for the categories "
                              f"{', '.join(categories)}")
    return Vocabulary(tuple(categories), tuple(concepts))


def _records(f: IO[bytes], path: Path) -> Iterator[tuple[int, list[str]]]:
    """CSV records of a binary file with the byte offset each starts at; a line longer than MAX_LINE, bytes
    that are no UTF-8 and broken CSV are one line naming the file."""
    position = f.tell()
    line_number = 0

    def lines() -> Iterator[str]:
        nonlocal position, line_number
        while line := f.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                raise DissectionError(f"{path} line {line_number + 1} is longer than {MAX_LINE:,} bytes")
            position += len(line)
            line_number += 1
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DissectionError(f"{path} line {line_number} is not UTF-8 text ({exc.reason} at byte "
                                      f"{position - len(line) + exc.start})") from None

    reader = csv.reader(lines())  # the reader asks for exactly the lines of one record, no more
    start = position
    try:
        for record in reader:
            yield start, record
            start = position
    except csv.Error as exc:
        raise DissectionError(f"{path} line {line_number} is no CSV: {first_line(exc)}") from None


@dataclass(frozen=True)
class IndexLayout:
    """Where index.csv keeps what: the header's width, the fixed columns' and the selected categories'
    positions, and which of those categories list PNG files (pixel level) rather than label numbers."""

    path: Path
    width: int
    fixed: dict[str, int]
    categories: tuple[tuple[str, int], ...]
    pixel_level: frozenset[str]

    def parse(self, record: list[str], line: int) -> Row:
        """One record as a Row; every problem is one line naming index.csv and the line."""
        path = self.path
        if len(record) != self.width:
            raise DissectionError(f"{path} line {line}: expected {self.width} fields, found {len(record)}")
        image = record[self.fixed["image"]].strip()
        if not image:
            raise DissectionError(f"{path} line {line}: the image is empty")
        pixel: list[str] = []
        levels: list[int] = []
        for name in (image, *self._cells(record, line, pixel, levels)):
            problem = relative_problem(name)
            if problem is not None:
                raise DissectionError(f"{path} line {line}: the file name {name!r} {problem}")
        return Row(image=image,
                   image_size=(self._size(record, "ih", line), self._size(record, "iw", line)),
                   label_size=(self._size(record, "sh", line), self._size(record, "sw", line)),
                   pixel_files=tuple(pixel), image_labels=tuple(levels))

    def _cells(self, record: list[str], line: int, pixel: list[str], levels: list[int]) -> list[str]:
        for category, position in self.categories:
            cell = record[position].strip()
            if not cell:
                continue
            parts = [p.strip() for p in cell.split(";") if p.strip()]
            if category in self.pixel_level:
                pixel.extend(parts)
            else:
                levels.extend(_number(p, f"the {category} label", self.path, line) for p in parts)
        return pixel

    def _size(self, record: list[str], column: str, line: int) -> int:
        value = record[self.fixed[column]].strip()
        try:
            size = int(value)
        except ValueError:
            raise DissectionError(f"{self.path} line {line}: {column} is {value!r}, not an integer") from None
        if size < 1:
            raise DissectionError(f"{self.path} line {line}: {column} is {size}; sizes are at least 1")
        return size


def _index_header(path: Path, categories: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    with path.open("rb") as f:
        first = next(_records(f, path), None)
    header = [h.strip() for h in first[1]] if first else []
    if header:
        header[0] = header[0].removeprefix("\ufeff")  # a byte-order mark a spreadsheet saved
    missing = [c for c in (*INDEX_FIXED, *categories) if c not in header]
    if missing:
        raise DissectionError(f"{path} is malformed: its header lacks the column(s) {', '.join(missing)}")
    return header, {c: header.index(c) for c in (*INDEX_FIXED, *categories)}


def scan_index(root: Path, categories: Sequence[str]) -> tuple[IndexLayout, array]:
    """Check every row of index.csv and keep only where each starts: 8 bytes a row, so an index of ten
    million rows costs 80 MB, not the gigabytes its parsed rows would. Every row must have the first row's
    image and label sizes (a run takes one of each). Returns the layout and the rows' byte offsets."""
    path = root / "index.csv"
    header, positions = _index_header(path, categories)
    pixel_level: set[str] = set()
    undecided = set(categories)
    layout = IndexLayout(path, len(header), {c: positions[c] for c in INDEX_FIXED},
                         tuple((c, positions[c]) for c in categories), frozenset())
    offsets = array("q")
    first: Row | None = None
    first_line = 0
    with path.open("rb") as f:
        records = _records(f, path)
        next(records, None)  # the header
        for line, (offset, record) in enumerate(records, start=2):
            if not record:
                continue  # a blank line
            if undecided and len(record) == layout.width:
                # Broden says which categories are pixel-level only through its cells: the first non-empty
                # cell of a column lists PNG names (pixel level) or label numbers (image level).
                decided = {c for c in undecided if record[positions[c]].strip()}
                if decided:
                    undecided -= decided
                    pixel_level |= {c for c in decided if not record[positions[c]].split(";")[0].strip().isdigit()}
                    layout = IndexLayout(path, layout.width, layout.fixed, layout.categories, frozenset(pixel_level))
            row = layout.parse(record, line)
            if first is None:
                check_pixels(*row.image_size, f"{path} line {line}: ih×iw", MAX_IMAGE_PIXELS)
                check_pixels(*row.label_size, f"{path} line {line}: sh×sw", MAX_LABEL_PIXELS)
                first, first_line = row, line
            elif (row.image_size, row.label_size) != (first.image_size, first.label_size):
                raise DissectionError(
                    f"{path} line {line}: images {row.image_size[0]}×{row.image_size[1]} and labels "
                    f"{row.label_size[0]}×{row.label_size[1]} (h×w), but line {first_line} says {first.image_size[0]}×"
                    f"{first.image_size[1]} and {first.label_size[0]}×{first.label_size[1]}: a run takes one "
                    "image size and one label size")
            offsets.append(offset)
    return layout, offsets


class BrodenDataset:
    """A Broden-format folder. ``categories`` selects and orders categories (default: category.csv).

    index.csv is checked row by row when the dataset opens, but only each row's byte offset is kept; a
    sample's row is read back from the file when it loads.
    """

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
        self.files = Confined(root)
        available = read_categories(root)
        self.categories = select_categories(available, categories)
        self.vocabulary = read_vocabulary(root, self.categories)
        self.layout, self.offsets = scan_index(root, self.categories)

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, index: int) -> Row:
        """Row ``index`` of index.csv, read back from the file (opened per row: far cheaper than decoding the
        row's images, and nothing is shared between worker processes)."""
        with self.layout.path.open("rb") as f:
            f.seek(self.offsets[index])
            found = next(_records(f, self.layout.path), None)
        if found is None:
            raise DissectionError(f"{self.layout.path} changed while it was in use: row {index + 2} is gone")
        return self.layout.parse(found[1], index + 2)

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Sample:
        row = self.row(index)
        images_dir = self.root / "images"
        rgb = None
        if image:
            path = images_dir / row.image
            what = f"image {path}"
            rgb = decode_rgb(self.files.file(path, what), what, row.image_size, "index.csv says")
        layers = None
        if labels:
            layers = np.zeros((len(row.pixel_files), *row.label_size), dtype=np.int32)
            for k, name in enumerate(row.pixel_files):
                path = images_dir / name
                what = f"label image {path}"
                layers[k] = decode_broden_labels(self.files.file(path, what), what, row.label_size,
                                                 "index.csv says")
        return Sample(index=index, image=rgb, layers=layers, image_labels=row.image_labels,
                      label_shape=row.label_size)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.row(index).image

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.root.resolve()), "images": len(self),
                "categories": list(self.categories), "concepts": len(self.vocabulary.concepts)}


def is_broden(path: Any) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / "index.csv").is_file() and (p / "category.csv").is_file()


@hookimpl
def dissect_register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    register("broden", BrodenDataset, description="Broden-format folder (index.csv, label.csv, c_*.csv, images/)",
             detect=is_broden)
