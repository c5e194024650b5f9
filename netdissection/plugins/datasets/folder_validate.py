"""``dissect data validate`` for the folder format: every problem at once, each with its file.

A dataset reader stops at the first problem (it has a run to protect); a validator reads everything and
reports all it finds, so a user fixes a folder in one round instead of one error per run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...core.errors import DissectionError
from .folder_dataset import CONCEPTS, Problem, categories_in_order, read_concepts, read_samples
from .labelmaps import decode_labels, decode_rgb
from .paths import Confined

#: At most this many unknown ids are named per label map.
SHOWN_IDS = 8


@dataclass
class FolderReport:
    """What the validator found: the problems, and the figures of the summary a clean folder gets."""

    problems: list[Problem] = field(default_factory=list)
    images: int = 0
    masks: int = 0
    concepts: int = 0
    categories: tuple[str, ...] = ()
    image_size: tuple[int, int] | None = None
    label_size: tuple[int, int] | None = None
    #: Per category, the images in which one of its concepts occurs.
    images_per_category: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.images} images ({_size(self.image_size)}), {self.masks} label maps "
                f"({_size(self.label_size)}), {self.concepts} concepts; images per category: "
                + ", ".join(f"{c} {n}" for c, n in self.images_per_category.items()))


def _size(shape: tuple[int, ...] | None) -> str:
    return f"{shape[0]}×{shape[1]}" if shape else "-"


def validate_folder(path: str | Path, progress: Callable[[int], None] | None = None) -> FolderReport:
    """Check a folder dataset: both CSV files, every image and label map they name, every id in every label
    map, sizes, and categories whose concepts occur nowhere."""
    root = Path(path).expanduser()
    report = FolderReport()
    if not root.is_dir():
        report.problems.append(Problem(str(root), "is not a folder"))
        return report
    concepts, problems = read_concepts(root)
    rows, more = read_samples(root, concepts)
    report.problems += problems + more
    report.concepts, report.categories, report.images = len(concepts), categories_in_order(concepts), len(rows)
    files = Confined(root)
    category = {c.number: c.category for c in concepts}
    known = np.array(sorted(category), dtype=np.int64)
    first_image: tuple[str, tuple[int, int]] | None = None
    first_mask: tuple[str, tuple[int, int]] | None = None
    seen: Counter[str] = Counter()
    for done, row in enumerate(rows, start=1):
        where = f"(samples.csv line {row.line})"
        present: set[int] = set(row.labels)
        try:
            shape = decode_rgb(files.file(root / row.image, "the image"), "the image").shape[:2]
            if first_image is None:
                first_image = (row.image, shape)
            elif shape != first_image[1]:
                report.problems.append(Problem(row.image, f"is {_size(shape)} (h×w) but {first_image[0]} is "
                                               f"{_size(first_image[1])}: the images of a set share one size"))
        except DissectionError as exc:
            report.problems.append(Problem(row.image, f"{str(exc).removeprefix('the image ')} {where}"))
        for mask in row.masks:
            report.masks += 1
            try:
                values = decode_labels(files.file(root / mask, "the label map"), "the label map")
            except DissectionError as exc:
                report.problems.append(Problem(mask, f"{str(exc).removeprefix('the label map ')} {where}"))
                continue
            if first_mask is None:
                first_mask = (mask, values.shape)
            elif values.shape != first_mask[1]:
                report.problems.append(Problem(mask, f"is {_size(values.shape)} (h×w) but {first_mask[0]} is "
                                              f"{_size(first_mask[1])}: the label maps of a set share one size"))
            ids = np.unique(values)
            ids = ids[ids != 0]
            unknown = ids[~np.isin(ids, known)]
            if unknown.size:
                shown = ", ".join(map(str, unknown[:SHOWN_IDS].tolist()))
                more = f" and {unknown.size - SHOWN_IDS} more" if unknown.size > SHOWN_IDS else ""
                report.problems.append(Problem(mask, f"holds ids that are not in concepts.csv: {shown}{more} "
                                              f"{where}"))
            present.update(int(i) for i in ids if int(i) in category)
        for c in {category[i] for i in present}:
            seen[c] += 1
        if progress is not None:
            progress(done)
    report.image_size = first_image[1] if first_image else None
    report.label_size = first_mask[1] if first_mask else None
    report.images_per_category = {c: seen[c] for c in report.categories}
    if rows:
        for c in report.categories:
            if not seen[c]:
                members = sum(1 for k in concepts if k.category == c)
                report.problems.append(Problem(CONCEPTS, f"the category {c!r} is empty: none of its {members} "
                                                         "concept(s) occurs in any label map or image-level label"))
    return report
