"""Write any concept dataset as a Broden folder, so every tool that reads Broden can read it.

What the writer must get right is what the Broden reader infers: it decides a label's primary category by
the largest coverage over the ``c_<category>.csv`` files, and whether a category column is pixel-level or
image-level by its first non-empty cell. So each label map is split by the primary category of its labels
(each label lands in exactly one column, hence one ``c_`` file, and reads back with the same primary
category), and a category that has both pixel layers and image-level labels gets its image-level labels
written as full label maps (the same pixels in either form). Frequencies and coverage are counted from the
samples written (:class:`~.data_stats.LabelStats`), not copied from the source.

The pieces every writer shares live here too: :func:`staging` (a folder appears only when complete) and
:func:`image_source` (copy an image's encoded bytes rather than re-encode: a JPEG decodes identically).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import DissectionError
from .data_stats import LabelStats
from .labelmaps import MAX_ID, encode_broden_rgb, encode_png, read_format, read_size

if TYPE_CHECKING:  # the protocols module imports torch; writers must not
    from ...core.protocols import ConceptDataset

log = logging.getLogger(__name__)

#: ``progress(done)`` is called after each sample a writer has written.
Progress = Callable[[int], None]


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A hidden sibling folder that is renamed to ``dest`` only when the block completes; removed otherwise.

    ``dest`` must not exist, or be an empty folder: a writer never mixes its files with others.
    """
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DissectionError(f"{dest} already exists and is not empty; pick a new folder or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); renaming over a folder is not portable
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def image_source(dataset: Any, index: int) -> tuple[bytes, str] | None:
    """The encoded bytes of image ``index`` and a file suffix, when the dataset can give them."""
    if hasattr(dataset, "image_bytes"):
        data: bytes = dataset.image_bytes(index)
        return data, read_format(data)
    if hasattr(dataset, "image_path"):
        path = Path(dataset.image_path(index))
        try:
            data = path.read_bytes()
        except OSError:
            raise DissectionError(f"image {path} is missing") from None
        return data, path.suffix.lower() or read_format(data)
    return None


def write_image(dataset: Any, index: int, folder: Path, stem: str) -> tuple[str, tuple[int, int]]:
    """Write image ``index`` as ``folder/stem.<ext>``: its original bytes, else a lossless PNG of the decoded
    image. Returns the file name and the image size ``(h, w)``."""
    source = image_source(dataset, index)
    if source is not None:
        data, suffix = source
        size = read_size(data, f"image {index}")
    else:
        image = dataset.load(index, image=True, labels=False).image
        data, suffix, size = encode_png(image), ".png", (image.shape[0], image.shape[1])
    name = f"{stem}{suffix}"
    (folder / name).write_bytes(data)
    return name, size


def stems(count: int) -> list[str]:
    width = max(6, len(str(count - 1)))
    return [f"{i:0{width}d}" for i in range(count)]


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(list(header))
        writer.writerows(rows)


@dataclass
class _Row:
    image: str
    image_size: tuple[int, int]
    label_size: tuple[int, int]
    pixel: dict[str, list[str]] = field(default_factory=dict)
    levels: dict[str, list[int]] = field(default_factory=dict)


def _split_by_category(layer: np.ndarray, category_of: np.ndarray) -> dict[int, np.ndarray]:
    """One layer → per primary category index, the layer with only that category's labels."""
    cats = category_of[layer]
    return {int(c): np.where(cats == c, layer, 0) for c in np.unique(cats[layer > 0]) if c >= 0}


def write_broden(dataset: ConceptDataset, dest: str | Path, *, progress: Progress | None = None) -> Path:
    """Write ``dataset`` as a Broden folder at ``dest`` (which must not exist yet); returns ``dest``."""
    vocab = dataset.vocabulary
    if vocab.size - 1 > MAX_ID:
        raise DissectionError(f"label numbers above {MAX_ID} do not fit Broden's label PNGs (R + 256·G)")
    categories = vocab.categories
    category_of = vocab.primary_category_index()
    stats = LabelStats(vocab)
    dest = Path(dest).expanduser()
    with staging(dest) as root:
        images = root / "images"
        images.mkdir()
        rows: list[_Row] = []
        for index, stem in enumerate(stems(len(dataset))):
            sample = dataset.load(index, image=False, labels=True)
            assert sample.layers is not None
            name, size = write_image(dataset, index, images, stem)
            row = _Row(name, size, sample.label_shape)
            for layer in sample.layers:
                for c, part in _split_by_category(layer, category_of).items():
                    files = row.pixel.setdefault(categories[c], [])
                    files.append(f"{stem}_{categories[c]}_{len(files) + 1}.png")
                    (images / files[-1]).write_bytes(encode_broden_rgb(part))
            for label in sample.image_labels:
                if category_of[label] >= 0:
                    row.levels.setdefault(categories[category_of[label]], []).append(label)
            stats.add(sample.layers, sample.image_labels, sample.label_shape)
            rows.append(row)
            if progress is not None:
                progress(index + 1)
        _levels_as_maps(rows, images)
        _write_tables(root, rows, stats)
    log.info("wrote %d images as a Broden folder at %s", len(rows), dest)
    return dest


def _levels_as_maps(rows: list[_Row], images: Path) -> None:
    """In a category with pixel layers anywhere, image-level labels become full label maps: a Broden column
    is either pixel-level or image-level, never both."""
    pixel_categories = {c for row in rows for c in row.pixel}
    for row in rows:
        stem = Path(row.image).stem
        for category in [c for c in row.levels if c in pixel_categories]:
            files = row.pixel.setdefault(category, [])
            for label in row.levels.pop(category):
                files.append(f"{stem}_{category}_{len(files) + 1}.png")
                (images / files[-1]).write_bytes(encode_broden_rgb(np.full(row.label_size, label, np.int64)))


def _write_tables(root: Path, rows: list[_Row], stats: LabelStats) -> None:
    vocab = stats.vocabulary
    categories = vocab.categories
    concepts = sorted(vocab.concepts, key=lambda c: c.number)
    label_rows: list[list[object]] = [[0, "-", "-", 0, 0.0, ""]]
    for c in concepts:
        frequency = int(stats.frequency[c.number])
        label_rows.append([c.number, c.name, f"{c.category}({frequency})", frequency,
                           repr(float(stats.coverage[c.number])), ""])
    write_csv(root / "label.csv", ("number", "name", "category", "frequency", "coverage", "syns"), label_rows)
    category_rows = []
    for category in categories:
        members = [c for c in concepts if c.category == category]
        annotated = sum(1 for r in rows if category in r.pixel or category in r.levels)
        category_rows.append([category, 1, len(members), len(members), annotated])
        write_csv(root / f"c_{category}.csv", ("code", "number", "name", "frequency", "coverage"),
                  [[code, c.number, c.name, int(stats.frequency[c.number]), repr(float(stats.coverage[c.number]))]
                   for code, c in enumerate(members, start=1)])
    write_csv(root / "category.csv", ("name", "first", "last", "count", "frequency"), category_rows)
    # index.csv last: it is what marks a folder as a Broden dataset.
    write_csv(root / "index.csv", ("image", "split", "ih", "iw", "sh", "sw", *categories), [
        [r.image, "train", *r.image_size, *r.label_size,
         *(";".join(r.pixel[c]) if c in r.pixel else ";".join(map(str, r.levels.get(c, []))) for c in categories)]
        for r in rows])
