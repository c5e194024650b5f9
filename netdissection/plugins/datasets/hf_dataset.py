"""The ``hf`` concept dataset format: a HuggingFace ``datasets`` dataset with an image column and label columns.

``--dataset hf:NAME_OR_PATH`` opens a folder written by ``save_to_disk`` (``load_from_disk``) or anything
``load_dataset`` opens (a hub name when online, a local data folder). Rows are read one at a time from the
memory-mapped Arrow files, never loaded whole; workers reopen the files lazily (the object pickles small).

Label columns (``--mask-column NAME`` or ``NAME:CATEGORY``, repeatable; default: every one found):

- an ``Image`` column, or a list of ``Image`` s, holds label maps (one label layer each) whose pixel values
  are concept ids, 0 = unlabelled, read exactly as the folder format reads them;
- a ``ClassLabel`` column (or a list of them) holds image-level labels; its class names are concepts of the
  column's category;
- an integer column (or a list of integers, picked automatically only as lists) holds image-level concept ids.

Concept ids of label maps and integer columns are named by a concepts file (``--concepts FILE``, or a
``concepts.csv`` inside a ``save_to_disk`` folder): the folder format's ``id,name,category`` CSV, or an
``id,name`` CSV / ``{"id": "name"}`` (``id2label``) JSON whose concepts all take the category of the label
map columns (``NAME:CATEGORY``; default: the column name). Each concept belongs to exactly one category.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import DissectionError, UnknownNameError, refuse_options
from ...core.hookspecs import hookimpl
from ...core.limits import MAX_LABEL_PIXELS, check_pixels
from ...core.types import Concept, Sample, Vocabulary, select_categories
from .folder_dataset import CATEGORY_NAME, CONCEPTS
from .labelmaps import MAX_ID, decode_labels, decode_rgb, read_size, selection_table
from .paths import regular_file

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

PREFIX = "hf:"
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@dataclass(frozen=True)
class LabelColumn:
    """A label column: ``kind`` is ``masks`` (label maps), ``classes`` (ClassLabel) or ``ids`` (concept ids);
    ``many`` when each row holds a list."""

    name: str
    category: str
    kind: str
    many: bool


def strip_prefix(ref: Any) -> str:
    text = str(ref)
    return text[len(PREFIX):] if text.startswith(PREFIX) else text


def is_saved(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def is_hf(path: Any) -> bool:
    return str(path).startswith(PREFIX) or is_saved(Path(str(path)).expanduser())


def _feature_kind(feature: Any) -> tuple[str, bool] | None:
    import datasets

    inner, many = feature, False
    if type(feature).__name__ in ("List", "LargeList", "Sequence") and hasattr(feature, "feature"):
        inner, many = feature.feature, True
    if isinstance(inner, datasets.Image):
        return "masks", many
    if isinstance(inner, datasets.ClassLabel):
        return "classes", many
    if isinstance(inner, datasets.Value) and inner.dtype in _INT_DTYPES:
        return "ids", many
    return None


def read_concepts_file(path: Path) -> list[tuple[int, str, str | None]]:
    """``(id, name, category or None)`` from an ``id,name[,category]`` CSV or an id2label JSON."""
    if not path.is_file():
        raise DissectionError(f"concepts file {path} does not exist")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            mapping = data.get("id2label", data) if isinstance(data, dict) else None
            if not isinstance(mapping, dict):
                raise DissectionError(f"concepts file {path} must hold an object {{\"id\": \"name\", ...}}")
            rows = [(int(k), str(v), None) for k, v in mapping.items()]
        else:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = [h.strip() for h in reader.fieldnames or []]
                reader.fieldnames = header
                if "id" not in header or "name" not in header:
                    raise DissectionError(f"concepts file {path} needs the columns id,name (and category)")
                rows = [(int(r["id"]), r["name"].strip(), (r.get("category") or "").strip() or None)
                        for r in reader]
    except ValueError as exc:
        raise DissectionError(f"concepts file {path}: {exc}") from None
    return rows


class _Vocab:
    """Builds the global vocabulary: ids of the concepts file, then ClassLabel classes numbered after them."""

    def __init__(self) -> None:
        self.concepts: dict[int, Concept] = {}
        self.by_name: dict[tuple[str, str], int] = {}

    def add(self, number: int, name: str, category: str, where: str) -> int:
        if not 1 <= number <= MAX_ID:
            raise DissectionError(f"{where}: concept id {number} is outside 1..{MAX_ID} (0 means unlabelled)")
        if number in self.concepts:
            raise DissectionError(f"{where}: concept id {number} is listed twice")
        if not CATEGORY_NAME.match(category):
            raise DissectionError(f"{where}: {category!r} is not a category name (letters, digits, '_', '-', '.')")
        self.concepts[number] = Concept(number, name, category, (category,))
        self.by_name.setdefault((category, name), number)
        return number

    def class_id(self, name: str, category: str, where: str) -> int:
        existing = self.by_name.get((category, name))
        if existing is not None:
            return existing
        return self.add(max(self.concepts, default=0) + 1, name, category, where)


class HFDataset:
    """A HuggingFace dataset as a concept set (see the module docstring for the columns it reads)."""

    format = "hf"

    def __init__(self, path: str | Path, categories: Sequence[str] | None = None, *,
                 image_column: str | None = None, mask_columns: Sequence[str] | None = None,
                 split: str | None = None, concepts: str | Path | None = None, **options: Any) -> None:
        refuse_options(options, "a HuggingFace dataset")
        self.ref = strip_prefix(path)
        local = Path(self.ref).expanduser()
        self.saved = is_saved(local)
        self.location = str(local.resolve()) if self.saved else self.ref
        self.split = split
        self._ds: Any = None
        self._views: dict[str, Any] = {}
        self._files: list[str] = []
        self._chosen_split = split
        ds = self._dataset()
        self.split = self._chosen_split
        # Workers reopen the very Arrow files (memory-mapped: cheap) rather than rerun the loader, which for a
        # hub name may ask the hub again. Not when an indices mapping reorders rows (a select()ed dataset).
        self._files = [f["filename"] for f in ds.cache_files] if ds._indices is None else []
        self.image_column = self._pick_image_column(ds.features, image_column)
        concepts_path = Path(concepts).expanduser() if concepts else None
        if concepts_path is None and self.saved and (local / CONCEPTS).is_file():
            concepts_path = local / CONCEPTS
        self.concepts_path = concepts_path
        self.columns = self._pick_label_columns(ds.features, mask_columns, concepts_path is not None)
        vocab, self.class_maps = self._vocabulary(ds.features, concepts_path)
        available = tuple(dict.fromkeys(c.category for c in vocab.concepts.values()))
        selected = select_categories(available, categories)
        chosen = tuple(sorted((c for c in vocab.concepts.values() if c.category in selected), key=lambda c: c.number))
        self.vocabulary = Vocabulary(selected, chosen)
        self.categories = selected
        self.known_ids = np.array(sorted(vocab.concepts), dtype=np.int64)
        self._lut: np.ndarray | None = None
        self.length = len(ds)
        self.label_size = self._first_mask_size(ds)

    # ---------------------------------------------------------------------------------------- opening

    def _open(self) -> datasets.Dataset:
        """The dataset of the chosen split, memory-mapped; sets ``_chosen_split``."""
        import datasets

        try:
            if self._files:
                tables = [datasets.Dataset.from_file(f) for f in self._files]
                return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
            if self.saved:
                opened = datasets.load_from_disk(self.location)
            else:
                opened = datasets.load_dataset(self.ref, split=self.split) if self.split else \
                    datasets.load_dataset(self.ref)
        except DissectionError:
            raise
        except Exception as exc:  # datasets raises many types; all mean "cannot open this reference"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DissectionError(f"cannot open the HuggingFace dataset {self.ref!r}: {first}") from None
        if isinstance(opened, datasets.DatasetDict | dict):
            splits = list(opened)
            if self.split is None:
                if len(splits) != 1:
                    raise DissectionError(f"the HuggingFace dataset {self.ref!r} has the splits "
                                          f"{', '.join(splits)}; pick one with --split")
                self._chosen_split = splits[0]
            elif self.split not in splits:
                raise UnknownNameError(f"split of {self.ref}", self.split, splits)
            else:
                self._chosen_split = self.split
            return opened[self._chosen_split]
        self._chosen_split = self.split
        return opened

    def _dataset(self) -> datasets.Dataset:
        if self._ds is None:
            self._ds = self._open()
        return self._ds

    def _view(self, which: str) -> Any:
        """Rows as Arrow slices of only the columns a pass needs: nothing is decoded by ``datasets``."""
        if which not in self._views:
            columns = [self.image_column] if which == "image" else [c.name for c in self.columns]
            self._views[which] = self._dataset().select_columns(columns).with_format("arrow")
        return self._views[which]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # Each worker reopens the memory-mapped files and rebuilds the table itself: the pickle stays small.
        state["_ds"], state["_views"], state["_lut"] = None, {}, None
        return state

    @property
    def lut(self) -> np.ndarray:
        """Id → id when selected, 0 for a concept of another category, -1 for an id that is no concept."""
        if self._lut is None:
            self._lut = selection_table(self.known_ids, [c.number for c in self.vocabulary.concepts])
        return self._lut

    # ---------------------------------------------------------------------------------------- columns

    def _pick_image_column(self, features: Any, name: str | None) -> str:
        import datasets

        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        if name is not None:
            if name not in features:
                raise UnknownNameError(f"column of {self.ref}", name, list(features))
            if name not in images:
                raise DissectionError(f"--image-column {name}: the column is {features[name]}, not an Image")
            return name
        if not images:
            raise DissectionError(f"the HuggingFace dataset {self.ref!r} has no Image column "
                                  f"(columns: {', '.join(features)}); name one with --image-column")
        return "image" if "image" in images else images[0]

    def _pick_label_columns(self, features: Any, specs: Sequence[str] | None, named: bool) -> list[LabelColumn]:
        columns = []
        if specs:
            for spec in specs:
                name, _, category = spec.partition(":")
                if name not in features:
                    raise UnknownNameError(f"column of {self.ref}", name, list(features))
                kind = _feature_kind(features[name])
                if kind is None or name == self.image_column:
                    raise DissectionError(
                        f"--mask-column {name}: the column is {features[name]}; a label column is an Image (label "
                        "maps), a ClassLabel (image-level classes) or integer concept ids, or a list of them")
                columns.append(LabelColumn(name, category or name, *kind))
            return columns
        for name, feature in features.items():
            kind = _feature_kind(feature)
            if name == self.image_column or kind is None:
                continue
            if kind[0] == "ids" and not (kind[1] and named):
                continue  # a scalar integer column is as likely a row id as a label: only when named
            columns.append(LabelColumn(name, name, *kind))
        if not columns:
            raise DissectionError(f"the HuggingFace dataset {self.ref!r} has no label column (columns: "
                                  f"{', '.join(features)}); name them with --mask-column")
        log.info("HuggingFace dataset %s: image column %s, label columns %s", self.ref, self.image_column,
                 ", ".join(f"{c.name} ({c.kind})" for c in columns))
        return columns

    def _vocabulary(self, features: Any, concepts_path: Path | None) -> tuple[_Vocab, dict[str, np.ndarray]]:
        vocab = _Vocab()
        by_id = [c for c in self.columns if c.kind in ("masks", "ids")]
        if by_id and concepts_path is None:
            raise DissectionError(f"column {by_id[0].name} of {self.ref} holds concept ids but nothing names them: "
                                  "pass --concepts FILE (an id,name,category CSV or an id2label JSON)")
        if concepts_path is not None:
            rows = read_concepts_file(concepts_path)
            fallback = {c.category for c in by_id}
            for number, name, category in rows:
                if number == 0:
                    log.info("concepts file %s: id 0 (%s) means unlabelled and is not a concept", concepts_path, name)
                    continue
                if category is None:
                    if len(fallback) != 1:
                        raise DissectionError(
                            f"concepts file {concepts_path} gives no categories and the label columns name "
                            f"{len(fallback) or 'no'} categories; add a category column (id,name,category)")
                    category = next(iter(fallback))
                vocab.add(number, name, category, f"concepts file {concepts_path}")
        class_maps = {}
        for column in self.columns:
            if column.kind == "classes":
                feature = features[column.name]
                names = (feature.feature if column.many else feature).names
                class_maps[column.name] = np.array(
                    [vocab.class_id(n, column.category, f"column {column.name}") for n in names], dtype=np.int64)
        if not vocab.concepts:
            raise DissectionError(f"the HuggingFace dataset {self.ref!r} names no concepts")
        return vocab, class_maps

    def _first_mask_size(self, ds: Any) -> tuple[int, int] | None:
        """The label resolution: the size of the first label map (every label map must have it)."""
        for column in (c for c in self.columns if c.kind == "masks"):
            for chunk in ds.data.column(column.name).chunks:
                for value in chunk:
                    item = value.as_py()
                    item = next((v for v in item if v), None) if column.many and item else item
                    if item:
                        what = f"the first label map of {self.ref}"
                        return read_size(self._source(item, what), what, MAX_LABEL_PIXELS)
        return None

    # ---------------------------------------------------------------------------------------- samples

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _source(value: Any, what: str) -> bytes | Path:
        if not isinstance(value, dict):
            raise DissectionError(f"{what} is {type(value).__name__}, not an image (bytes or a path)")
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            # A row may name a file instead of holding its bytes (datasets' imagefolder does): read it where
            # it is, as the datasets library would, but never a FIFO or a device, which would block the run.
            return regular_file(Path(value["path"]), f"{what} ({value['path']})")
        raise DissectionError(f"{what} has neither bytes nor a path")

    def _where(self, index: int, column: str) -> str:
        return f"row {index} of {self.ref} (column {column})"

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of row ``index`` (writers copy it rather than re-encode)."""
        value = self._view("image")[index].column(self.image_column)[0].as_py()
        source = self._source(value or {}, f"the image of {self._where(index, self.image_column)}")
        return source if isinstance(source, bytes) else source.read_bytes()

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Sample:
        rgb = None
        if image:
            value = self._view("image")[index].column(self.image_column)[0].as_py()
            what = f"the image of {self._where(index, self.image_column)}"
            if not value:
                raise DissectionError(f"{what} is empty")
            rgb = decode_rgb(self._source(value, what), what)
        shape = self.label_size
        if shape is None:
            what = f"the image of {self._where(index, self.image_column)}"
            shape = rgb.shape[:2] if rgb is not None else read_size(
                self._source(self._view("image")[index].column(self.image_column)[0].as_py() or {}, what), what)
            check_pixels(shape[0], shape[1], f"{what} (the label resolution: the dataset has no label maps)",
                         MAX_LABEL_PIXELS)
        layers = None
        image_labels: list[int] = []
        if labels:
            row = self._view("labels")[index]
            maps: list[np.ndarray] = []
            for column in self.columns:
                value = row.column(column.name)[0].as_py()
                items = [v for v in (value if column.many else [value]) if v is not None] if value is not None else []
                if column.kind == "masks":
                    maps.extend(self._mask(item, index, column.name, shape) for item in items if item)
                elif column.kind == "classes":
                    image_labels.extend(self._classes(items, index, column.name))
                else:
                    image_labels.extend(self._ids(np.array(items, dtype=np.int64), index, column.name).tolist())
            layers = np.stack(maps) if maps else np.zeros((0, *shape), dtype=np.int32)
        selected = tuple(dict.fromkeys(n for n in image_labels if n > 0))
        return Sample(index=index, image=rgb, layers=layers, image_labels=selected, label_shape=shape)

    def _classes(self, items: list[int], index: int, column: str) -> list[int]:
        """Concept ids of ClassLabel values (-1: no label); a value past the class names is an error."""
        classes = self.class_maps[column]
        bad = [k for k in items if k >= len(classes)]
        if bad:
            raise DissectionError(f"{self._where(index, column)} holds the class {bad[0]}, but the column names "
                                  f"only {len(classes)} classes")
        return [int(self.lut[classes[k]]) for k in items if k >= 0]

    def _ids(self, values: np.ndarray, index: int, column: str) -> np.ndarray:
        values = values[values > 0]
        mapped = self.lut[np.minimum(values, MAX_ID)]
        bad = (mapped < 0) | (values > MAX_ID)
        if bad.any():
            raise DissectionError(f"{self._where(index, column)} holds ids {np.unique(values[bad])[:5].tolist()} "
                                  "that the concepts file does not name")
        return mapped

    def _mask(self, value: dict[str, Any], index: int, column: str, shape: tuple[int, int]) -> np.ndarray:
        what = f"the label map of {self._where(index, column)}"
        values = decode_labels(self._source(value, what), what, shape, "the first label map is")
        mapped = self.lut[values]
        if (mapped < 0).any():
            unknown = np.unique(values[mapped < 0])[:5].tolist()
            raise DissectionError(f"{what} holds ids {unknown} that the concepts file does not name")
        return mapped.astype(np.int32)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.location, "split": self.split, "images": self.length,
                "image_column": self.image_column,
                "label_columns": [f"{c.name}:{c.category}" if c.kind == "classes" else c.name for c in self.columns],
                "categories": list(self.categories), "concepts": len(self.vocabulary.concepts),
                # What reopens this dataset: factory(path, categories=..., **options).
                "options": {"image_column": self.image_column, "split": self.split,
                            "mask_columns": [f"{c.name}:{c.category}" for c in self.columns],
                            "concepts": str(self.concepts_path) if self.concepts_path else None}}


@hookimpl
def dissect_register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    from .hf_writer import write_hf

    register("hf", HFDataset, description="HuggingFace datasets: hf:NAME_OR_PATH (save_to_disk folder or hub name) "
             "with --image-column, --mask-column NAME[:CATEGORY], --split, --concepts", detect=is_hf, writer=write_hf)
