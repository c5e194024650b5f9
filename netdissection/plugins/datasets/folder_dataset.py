"""The ``folder`` concept dataset format: pixel-labelled concepts a user can make in an afternoon.

Layout (the full description is docs/concept-folder.md)::

    my-concepts/
      concepts.csv   id,name,category      one row per concept; each id belongs to exactly one category
      samples.csv    image,masks,labels    one row per image; paths are relative to the folder
      ...            images and label maps, in any sub-folders

``masks`` lists ``;``-separated label maps (one label layer each: 8/16-bit grayscale, palette or Broden RGB
PNGs whose pixel values are concept ids, 0 = unlabelled); ``labels`` lists ``;``-separated image-level
concept ids or names. The primary category of a concept is the one category ``concepts.csv`` gives it,
so no coverage bookkeeping is needed and ``--categories`` simply keeps the concepts of those categories.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ...core.errors import DissectionError, UnknownNameError, refuse_options
from ...core.hookspecs import hookimpl
from ...core.limits import MAX_LABEL_PIXELS, check_pixels
from ...core.types import Concept, Sample, Vocabulary, select_categories
from .labelmaps import MAX_ID, decode_labels, decode_rgb, read_size, selection_table
from .paths import Confined, portable, relative_problem

log = logging.getLogger(__name__)

CONCEPTS = "concepts.csv"
SAMPLES = "samples.csv"
CONCEPT_COLUMNS = ("id", "name", "category")
SAMPLE_COLUMNS = ("image", "masks", "labels", "split")
#: Category names end up in file names (c_<category>.csv) and CSV headers (<category>-iou).
CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, attributed to a file (and a line, where there is one)."""

    file: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return self.located()

    def located(self, root: Path | None = None) -> str:
        """``FILE[ line N]: message``, with ``FILE`` under ``root`` when given."""
        name = str(root / self.file) if root is not None else self.file
        where = f"{name} line {self.line}" if self.line is not None else name
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class FolderRow:
    """One line of samples.csv, parsed: relative paths and resolved image-level concept ids."""

    line: int
    image: str
    masks: tuple[str, ...]
    labels: tuple[int, ...]


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets save a BOM
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            return header, [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DissectionError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DissectionError(f"{path} is no CSV file: {str(exc).strip() or type(exc).__name__}") from None


def read_concepts(root: Path) -> tuple[list[Concept], list[Problem]]:
    """The concepts of ``concepts.csv`` in file order, and every problem found in it."""
    path = root / CONCEPTS
    if not path.is_file():
        return [], [Problem(CONCEPTS, "is missing: a folder dataset needs concepts.csv with the columns "
                                      "id,name,category")]
    header, rows = _read_rows(path)
    missing = [c for c in CONCEPT_COLUMNS if c not in header]
    if missing:
        return [], [Problem(CONCEPTS, f"the header lacks the column(s) {', '.join(missing)} "
                                      f"(it must start with: {','.join(CONCEPT_COLUMNS)})")]
    problems: list[Problem] = []
    concepts: list[Concept] = []
    seen_ids: dict[int, int] = {}
    seen_names: dict[tuple[str, str], int] = {}
    for line, row in rows:
        raw_id, name, category = ((row.get(c) or "").strip() for c in CONCEPT_COLUMNS)
        try:
            number = int(raw_id)
        except ValueError:
            problems.append(Problem(CONCEPTS, f"id {raw_id!r} is not an integer", line))
            continue
        bad = []
        if not 1 <= number <= MAX_ID:
            bad.append(f"id {number} is outside 1..{MAX_ID} (0 means unlabelled)")
        if number in seen_ids:
            bad.append(f"id {number} is already used on line {seen_ids[number]}")
        if not name:
            bad.append(f"id {number} has no name")
        if not CATEGORY_NAME.match(category):
            bad.append(f"id {number} has the category {category!r}; a category is a word of letters, digits, "
                       "'_', '-' or '.'")
        elif (category, name) in seen_names:
            bad.append(f"the name {name!r} is already used in the category {category} on line "
                       f"{seen_names[(category, name)]}")
        problems.extend(Problem(CONCEPTS, b, line) for b in bad)
        if not bad:
            seen_ids[number] = line
            seen_names[(category, name)] = line
            concepts.append(Concept(number, name, category, (category,)))
    if not concepts and not problems:
        problems.append(Problem(CONCEPTS, "lists no concepts"))
    return concepts, problems


def _relative(value: str) -> str | None:
    """A portable relative path, or None when it is absolute or leaves the folder."""
    if relative_problem(value) is not None:
        return None
    return str(PurePosixPath(portable(value)))


def read_samples(root: Path, concepts: Sequence[Concept]) -> tuple[list[FolderRow], list[Problem]]:
    """The rows of ``samples.csv`` with image-level labels resolved to ids, and every problem in the file
    itself (files it names are checked by the validator and when samples load)."""
    path = root / SAMPLES
    if not path.is_file():
        return [], [Problem(SAMPLES, "is missing: a folder dataset needs samples.csv with the columns "
                                     "image,masks,labels")]
    header, rows = _read_rows(path)
    problems: list[Problem] = []
    if "image" not in header:
        problems.append(Problem(SAMPLES, "the header lacks the column 'image'"))
    for column in header:
        if column not in SAMPLE_COLUMNS:
            close = UnknownNameError("column", column, SAMPLE_COLUMNS)
            problems.append(Problem(SAMPLES, f"{close}; columns are {', '.join(SAMPLE_COLUMNS)}"))
    if not ({"masks", "labels"} & set(header)):
        problems.append(Problem(SAMPLES, "has neither a 'masks' nor a 'labels' column: nothing is labelled"))
    if problems:
        return [], problems

    by_id = {c.number for c in concepts}
    by_name: dict[str, list[int]] = {}
    for c in concepts:
        by_name.setdefault(c.name, []).append(c.number)
    out: list[FolderRow] = []
    seen_images: dict[str, int] = {}
    for line, row in rows:
        if None in row:
            problems.append(Problem(SAMPLES, f"has more fields than the {len(header)} columns of the header", line))
            continue
        image = (row.get("image") or "").strip()
        row_problems: list[str] = []
        if not image:
            row_problems.append("no image")
        elif _relative(image) is None:
            row_problems.append(f"the image path {image} must be relative to the folder")
        elif image in seen_images:
            row_problems.append(f"the image {image} is already listed on line {seen_images[image]}")
        masks = [m.strip() for m in (row.get("masks") or "").split(";") if m.strip()]
        row_problems += [f"the mask path {m} must be relative to the folder" for m in masks if _relative(m) is None]
        labels: list[int] = []
        for item in (i.strip() for i in (row.get("labels") or "").split(";")):
            if not item:
                continue
            if item.lstrip("-").isdigit():
                if int(item) in by_id:
                    labels.append(int(item))
                else:
                    row_problems.append(f"the image-level label {item} is not an id in concepts.csv")
            elif len(by_name.get(item, [])) == 1:
                labels.append(by_name[item][0])
            elif item in by_name:
                row_problems.append(f"the image-level label {item!r} names several concepts "
                                    f"(ids {', '.join(map(str, by_name[item]))}); use the id")
            else:
                row_problems.append(str(UnknownNameError("image-level label", item, by_name)))
        problems.extend(Problem(SAMPLES, p, line) for p in row_problems)
        if not row_problems:
            seen_images[image] = line
            out.append(FolderRow(line, str(_relative(image)), tuple(str(_relative(m)) for m in masks),
                                 tuple(dict.fromkeys(labels))))
    if not out and not problems:
        problems.append(Problem(SAMPLES, "lists no samples"))
    return out, problems


def categories_in_order(concepts: Sequence[Concept]) -> tuple[str, ...]:
    """Categories in order of first appearance in concepts.csv: the report's column order."""
    return tuple(dict.fromkeys(c.category for c in concepts))


def first_mask(root: Path, rows: Sequence[FolderRow]) -> str | None:
    return next((m for r in rows for m in r.masks), None)


class FolderDataset:
    """A ``folder``-format concept set. ``categories`` selects and orders categories (default: all, in
    concepts.csv order); a concept of an unselected category reads as unlabelled."""

    format = "folder"

    def __init__(self, path: str | Path, categories: Sequence[str] | None = None, **options: Any) -> None:
        refuse_options(options, "a folder dataset")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DissectionError(f"dataset folder {root} does not exist" if not root.exists()
                                  else f"dataset {root} is not a folder")
        self.root = root
        concepts, problems = read_concepts(root)
        rows, more = read_samples(root, concepts) if not problems else ([], [])
        problems += more
        if problems:
            extra = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DissectionError(f"{problems[0].located(root)}{extra}; list them all with: "
                                  f"dissect data validate {root}")
        available = categories_in_order(concepts)
        selected = select_categories(available, categories)
        self.categories = selected
        self.vocabulary = Vocabulary(selected, tuple(sorted((c for c in concepts if c.category in selected),
                                                            key=lambda c: c.number)))
        self.rows = rows
        self.files = Confined(root)
        self.known_ids = np.array(sorted(c.number for c in concepts), dtype=np.int64)
        mask = first_mask(root, rows)
        #: The set's label resolution: every label map has the size of the first one.
        self.label_size = None
        self.first_mask = mask
        if mask:
            what = f"label map {root / mask}"
            self.label_size = read_size(self.files.file(root / mask, what), what, MAX_LABEL_PIXELS)
        self._lut: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lut"] = None  # rebuilt on first use in each worker process: pickling stays small
        return state

    def _table(self) -> np.ndarray:
        """Id → id if the concept is selected, 0 if it is a concept of another category, -1 if unknown."""
        if self._lut is None:
            self._lut = selection_table(self.known_ids, [c.number for c in self.vocabulary.concepts])
        return self._lut

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        return self.root / self.rows[index].image

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Sample:
        row = self.rows[index]
        image_path = self.image_path(index)
        what = f"image {image_path}"
        rgb = decode_rgb(self.files.file(image_path, what), what) if image else None
        shape = self.label_size
        if shape is None:  # no label maps anywhere: image-level labels cover the image
            shape = rgb.shape[:2] if rgb is not None else read_size(self.files.file(image_path, what), what)
            check_pixels(shape[0], shape[1], f"{what} (the label resolution: the set has no label maps)",
                         MAX_LABEL_PIXELS)
        layers = None
        image_labels: tuple[int, ...] = ()
        if labels:
            lut = self._table()
            layers = np.zeros((len(row.masks), *shape), dtype=np.int32)
            for k, name in enumerate(row.masks):
                path = self.root / name
                what = f"label map {path}"
                values = decode_labels(self.files.file(path, what), what, shape,
                                       f"the first label map of the set, {self.first_mask}, is")
                mapped = lut[values]
                if (mapped < 0).any():
                    unknown = np.unique(values[mapped < 0])[:5].tolist()
                    raise DissectionError(f"label map {path} holds ids {unknown} that are not in {CONCEPTS}; "
                                          f"check the folder with: dissect data validate {self.root}")
                layers[k] = mapped
            image_labels = tuple(n for n in row.labels if self._table()[n] > 0)
        return Sample(index=index, image=rgb, layers=layers, image_labels=image_labels, label_shape=shape)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.root.resolve()), "images": len(self.rows),
                "categories": list(self.categories), "concepts": len(self.vocabulary.concepts)}


def is_folder(path: Any) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / CONCEPTS).is_file() and (p / SAMPLES).is_file()


@hookimpl
def dissect_register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    from .folder_validate import validate_folder
    from .folder_writer import write_folder

    register("folder", FolderDataset, description="your own concepts: concepts.csv + samples.csv + label PNGs "
             "(docs/concept-folder.md)", detect=is_folder, validate=validate_folder, writer=write_folder)
