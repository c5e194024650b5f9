"""Label statistics of a concept dataset, counted from the samples exactly as the dissection sees them.

Used by ``dissect data info`` and by the dataset writers (the Broden writer's label.csv, category.csv and
c_<category>.csv come from these counts, so what they claim is what the files hold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...core.types import Vocabulary


@dataclass(frozen=True)
class CategoryStats:
    """One category over the whole set. ``coverage`` is the fraction of all label pixels it labels."""

    name: str
    concepts: int
    concepts_seen: int
    images: int
    pixel_level: bool
    image_level: bool
    coverage: float

    @property
    def level(self) -> str:
        return {(True, True): "pixel+image", (True, False): "pixel", (False, True): "image"}.get(
            (self.pixel_level, self.image_level), "-")


class LabelStats:
    """Per label number: images it occurs in (``frequency``) and ``coverage``, the sum over images of the
    fraction of the image's label pixels it covers (a pixel counts once however many layers give it the label;
    an image-level label covers the whole image). Per category: images, covered pixels, and whether it
    comes as pixel labels, image-level labels or both."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.category_of = vocabulary.primary_category_index()
        n, c = vocabulary.size, len(vocabulary.categories)
        self.images = 0
        self.pixels = 0
        self.frequency = np.zeros(n, dtype=np.int64)
        self.coverage = np.zeros(n, dtype=np.float64)
        self.category_images = np.zeros(c, dtype=np.int64)
        self.category_pixels = np.zeros(c, dtype=np.int64)
        self.pixel_level = np.zeros(c, dtype=bool)
        self.image_level = np.zeros(c, dtype=bool)

    def add(self, layers: np.ndarray, image_labels: Sequence[int], shape: tuple[int, int]) -> None:
        """Count one sample: ``layers`` ``(K, h, w)`` label numbers (0 = none), image-level label numbers."""
        area = int(shape[0] * shape[1])
        n = self.frequency.shape[0]
        flat = np.asarray(layers, dtype=np.int64).reshape(-1, area)
        _, position = np.nonzero(flat)
        labels = flat[flat != 0]
        # A (label, pixel) pair counts once whatever the number of layers that carry it.
        pairs = np.unique(labels * area + position)
        pixels = np.bincount(pairs // area, minlength=n)
        levels = np.array([label for label in image_labels if 0 < label < n], dtype=np.int64)
        pixels[levels] = area
        present = np.flatnonzero(pixels)
        self.frequency[present] += 1
        self.coverage[present] += pixels[present] / area

        categories = len(self.vocabulary.categories)
        pixel_cats = self.category_of[pairs // area]
        known = pixel_cats >= 0  # -1: a number that is no concept of the vocabulary (datasets map those to 0)
        keys = np.unique(pixel_cats[known] * area + pairs[known] % area)
        covered = np.bincount(keys // area, minlength=categories)
        self.pixel_level[np.unique(pixel_cats[known])] = True
        level_cats = self.category_of[levels]
        level_cats = np.unique(level_cats[level_cats >= 0])
        self.image_level[level_cats] = True
        covered[level_cats] = area
        self.category_pixels += covered
        self.category_images += covered > 0
        self.pixels += area
        self.images += 1

    def categories(self) -> list[CategoryStats]:
        out = []
        for i, name in enumerate(self.vocabulary.categories):
            members = self.category_of == i
            out.append(CategoryStats(
                name=name,
                concepts=int(members.sum()),
                concepts_seen=int((self.frequency[members] > 0).sum()),
                images=int(self.category_images[i]),
                pixel_level=bool(self.pixel_level[i]),
                image_level=bool(self.image_level[i]),
                coverage=float(self.category_pixels[i] / self.pixels) if self.pixels else 0.0,
            ))
        return out
