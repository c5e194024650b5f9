"""The ``npz`` concept-set format: a whole (small) concept set in one numpy ``.npz`` file.

Arrays (read with ``allow_pickle=False``):

- ``images`` ``(N, H, W, 3)`` uint8 RGB;
- ``labels`` ``(N, K, sh, sw)`` integer pixel label layers (global concept numbers, 0 = unlabelled);
- ``image_labels`` ``(N, M)`` integer image-level labels (0 = none);
- ``concept_numbers``, ``concept_names``, ``concept_categories`` ``(C,)``: the vocabulary, each concept with
  its (primary) category;
- ``categories`` ``(G,)``: the categories, in report order.

Selecting categories keeps the concepts whose category is selected; other labels read as 0.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netdissection import Concept, ConceptDataset, DissectionError, Sample, Vocabulary
from netdissection.core.errors import refuse_options
from netdissection.core.files import atomic_write
from netdissection.core.types import select_categories

FORMAT = "npz"
ARRAYS = ("images", "labels", "image_labels", "concept_numbers", "concept_names", "concept_categories",
          "categories")


def is_npz(path: Any) -> bool:
    p = Path(str(path)).expanduser()
    return p.suffix.lower() == ".npz" and p.is_file()


class NpzDataset:
    """A concept set in one ``.npz`` file; the arrays are read once per process, on first use."""

    format = FORMAT

    def __init__(self, path: str | Path, categories: Sequence[str] | None = None, **options: Any) -> None:
        refuse_options(options, "the npz format")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DissectionError(f"npz concept set {self.path} does not exist")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = [key for key in ARRAYS if key not in data.files]
                if missing:
                    raise DissectionError(f"{self.path} is not an npz concept set: it lacks {', '.join(missing)}")
                available = [str(c) for c in data["categories"]]
                numbers, names = data["concept_numbers"].tolist(), data["concept_names"].tolist()
                concept_categories = data["concept_categories"].tolist()
                self._count = int(data["images"].shape[0])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DissectionError(f"{self.path} cannot be read as an npz concept set ({exc})") from None
        self.categories = select_categories(available, categories)
        kept = [Concept(int(n), str(name), str(cat)) for n, name, cat in zip(numbers, names, concept_categories,
                                                                           strict=True) if cat in self.categories]
        self.vocabulary = Vocabulary(self.categories, tuple(kept))
        self._kept = np.zeros(max([int(n) for n in numbers], default=0) + 1, dtype=bool)
        self._kept[[c.number for c in kept]] = True
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:  # worker processes read the file themselves
        return {**self.__dict__, "_arrays": None}

    def _data(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            with np.load(self.path, allow_pickle=False) as data:
                self._arrays = {key: data[key] for key in ("images", "labels", "image_labels")}
        return self._arrays

    def __len__(self) -> int:
        return self._count

    def _keep(self, labels: np.ndarray) -> np.ndarray:
        labels = labels.astype(np.int64)
        inside = (labels > 0) & (labels < self._kept.size)
        known = np.zeros(labels.shape, dtype=bool)
        known[inside] = self._kept[labels[inside]]
        return np.where(known, labels, 0)

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Sample:
        data = self._data()
        if not 0 <= index < self._count:
            raise DissectionError(f"{self.path} has no sample {index}")
        layers = self._keep(data["labels"][index]) if labels else None
        image_labels = tuple(int(v) for v in self._keep(data["image_labels"][index]) if v) if labels else ()
        return Sample(index=index, image=np.ascontiguousarray(data["images"][index]) if image else None,
                      layers=layers, image_labels=image_labels, label_shape=tuple(data["labels"].shape[2:]))

    def describe(self) -> dict[str, Any]:
        return {"format": FORMAT, "path": str(self.path.resolve()), "images": self._count,
                "categories": list(self.categories), "concepts": len(self.vocabulary.concepts)}


def write_npz(dataset: ConceptDataset, dest: str | Path, *, progress: Callable[[int], None] | None = None) -> Path:
    """Write any concept dataset as one ``.npz`` file at ``dest`` (atomically). Every image must have the
    same size and every sample the same label size."""
    dest = Path(dest).expanduser()
    if dest.suffix.lower() != ".npz":
        raise DissectionError(f"{dest}: an npz concept set is one file named *.npz")
    if dest.exists():
        raise DissectionError(f"{dest} exists already; pass a new file name")
    images, layers, image_labels = [], [], []
    for index in range(len(dataset)):
        sample = dataset.load(index)
        assert sample.image is not None and sample.layers is not None
        if images and (sample.image.shape != images[0].shape or sample.layers.shape[1:] != layers[0].shape[1:]):
            raise DissectionError(f"sample {index} has another image or label size than sample 0; the npz "
                                  "format holds one size")
        images.append(sample.image)
        layers.append(sample.layers)
        image_labels.append(list(sample.image_labels))
        if progress is not None:
            progress(index + 1)
    depth = max((len(x) for x in layers), default=0)
    stacked = np.zeros((len(layers), depth, *layers[0].shape[1:]), dtype=np.int32)
    for i, x in enumerate(layers):
        stacked[i, : len(x)] = x
    width = max((len(x) for x in image_labels), default=0)
    flat = np.zeros((len(image_labels), width), dtype=np.int32)
    for i, x in enumerate(image_labels):
        flat[i, : len(x)] = x
    vocab = dataset.vocabulary
    arrays = {"images": np.stack(images), "labels": stacked, "image_labels": flat,
              "concept_numbers": np.array([c.number for c in vocab.concepts], dtype=np.int64),
              "concept_names": np.array([c.name for c in vocab.concepts], dtype=str),
              "concept_categories": np.array([c.category for c in vocab.concepts], dtype=str),
              "categories": np.array(vocab.categories, dtype=str)}

    def write(f: Any) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        f.write(buffer.getvalue())

    return atomic_write(dest, write)
