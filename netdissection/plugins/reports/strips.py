"""Each unit's top images as one JPEG strip: the overlays of its top-k images side by side.

One file per unit (not per image) keeps a 512-unit layer at 512 small files and one ``<img>`` per card:
the page loads fast, JPEG headers are paid once per strip, and NetDissect's readers know the look.
The images come from the run's concept dataset; the raw maps and thresholds from the run's results,
so no model runs again.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.types import LayerResult
from .overlay import unit_overlay

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

GAP = 2  # pixels between tiles
BACKGROUND = (34, 34, 34)


@dataclass(frozen=True)
class Strip:
    """A written strip: its file, its size in pixels, and the (dataset index, peak) of each tile."""

    path: Path
    width: int
    height: int
    tiles: tuple[tuple[int, float], ...]


class ImageSource:
    """Dataset images by index, decoded once and kept in an LRU bounded in bytes (top images repeat
    across units, and decoding is a good part of the work)."""

    def __init__(self, dataset: Any, budget_bytes: int = 256 << 20) -> None:
        self.dataset = dataset
        self.budget = budget_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0

    def __call__(self, index: int) -> np.ndarray:
        image = self._cache.get(index)
        if image is not None:
            self._cache.move_to_end(index)
            return image
        sample = self.dataset.load(index, image=True, labels=False)
        image = np.ascontiguousarray(sample.image, dtype=np.uint8)
        self._cache[index] = image
        self._bytes += image.nbytes
        while self._bytes > self.budget and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.nbytes
        return image


def fit(shape: tuple[int, ...], tile: int) -> tuple[int, int]:
    """(width, height) of an image of ``shape`` (H, W, ...) scaled to fit a tile×tile square."""
    h, w = shape[0], shape[1]
    scale = tile / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def tile_size(shapes: list[tuple[int, ...]], tile: int) -> int:
    """The strip's square: ``tile`` pixels, or less when every image is smaller (never enlarge them all)."""
    return min(tile, max(max(shape[0], shape[1]) for shape in shapes))


def outline_width(shape: tuple[int, ...], tile: int) -> int:
    """Outline pixels at image resolution so the outline stays about one pixel wide in the tile."""
    return max(1, round(max(shape[0], shape[1]) / tile))


def scale_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` scaled to ``size``: averaging whole pixels when shrinking (``reduce`` for exact integer
    factors, ~4x faster than a BOX resize and the same pixels), bilinear when enlarging."""
    from PIL import Image

    if size == image.size:
        return image
    factor = image.size[0] // size[0]
    if factor >= 2 and image.size == (size[0] * factor, size[1] * factor):
        return image.reduce(factor)
    shrinking = size[0] < image.size[0]
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def compose_strip(overlays: list[np.ndarray], tile: int) -> Image.Image:
    """The overlays scaled to fit tile×tile squares, side by side with a small gap, as one RGB image."""
    from PIL import Image

    n = len(overlays)
    strip = Image.new("RGB", (n * tile + (n - 1) * GAP, tile), BACKGROUND)
    for i, overlay in enumerate(overlays):
        size = fit(overlay.shape, tile)
        tile_image = scale_to(Image.fromarray(overlay), size)
        strip.paste(tile_image, (i * (tile + GAP) + (tile - size[0]) // 2, (tile - size[1]) // 2))
    return strip


def unit_tiles(layer: LayerResult, unit: int, top_k: int | None) -> list[tuple[int, int]]:
    """(slot, dataset index) of a unit's top images, best first, empty slots (index -1) left out."""
    assert layer.top_images is not None
    indices = layer.top_images.indices[unit]
    slots = [(j, int(i)) for j, i in enumerate(indices) if i >= 0]
    return slots if top_k is None else slots[:top_k]


def unit_overlays(layer: LayerResult, unit: int, images: Callable[[int], np.ndarray], tile: int,
                  top_k: int | None) -> tuple[list[np.ndarray], tuple[tuple[int, float], ...]]:
    """The lossless overlays of a unit's top images (before any scaling or JPEG) and their (index, peak)."""
    pictures = [(slot, index, images(index)) for slot, index in unit_tiles(layer, unit, top_k)]
    return _overlays(layer, unit, pictures, tile)


Picture = tuple[int, int, np.ndarray]  # (slot in the top-k, dataset index, RGB image)


def _overlays(layer: LayerResult, unit: int, pictures: list[Picture], tile: int
              ) -> tuple[list[np.ndarray], tuple[tuple[int, float], ...]]:
    assert layer.top_images is not None
    top = layer.top_images
    threshold = float(layer.thresholds[unit])
    square = tile_size([image.shape for _slot, _index, image in pictures], tile)
    overlays = [unit_overlay(image, top.maps[unit, slot], threshold, outline_width(image.shape, square))
                for slot, _index, image in pictures]
    return overlays, tuple((index, float(top.scores[unit, slot])) for slot, index, _image in pictures)


def write_layer_strips(layer: LayerResult, images: Callable[[int], np.ndarray], folder: Path, *,
                       tile: int, quality: int, top_k: int | None, workers: int | None = None
                       ) -> dict[int, Strip]:
    """Write ``unit0001.jpg``... into ``folder`` (units 1-based, as in tally.csv); the strips by unit index.

    Images are decoded in this thread (datasets need not be thread-safe); overlays, scaling and JPEG
    encoding run in a few threads (numpy and Pillow release the GIL for the heavy parts), with a bounded
    number of units in flight so memory stays small whatever the layer's size.
    """
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(layer.units)))

    def encode(unit: int, pictures: list[Picture]) -> Strip:
        overlays, tiles = _overlays(layer, unit, pictures, tile)
        strip = compose_strip(overlays, tile_size([o.shape for o in overlays], tile))
        path = folder / f"unit{unit + 1:0{digits}d}.jpg"
        strip.save(path, format="JPEG", quality=quality, optimize=True)
        return Strip(path, strip.width, strip.height, tiles)

    def jobs() -> Iterator[tuple[int, list[Picture]]]:
        for unit in range(layer.units):
            pictures = [(slot, index, images(index)) for slot, index in unit_tiles(layer, unit, top_k)]
            if pictures:
                yield unit, pictures

    workers = workers or min(4, os.cpu_count() or 1)
    strips: dict[int, Strip] = {}
    if workers <= 1:
        for unit, pictures in jobs():
            strips[unit] = encode(unit, pictures)
        return strips
    pending: deque[tuple[int, Future[Strip]]] = deque()
    with ThreadPoolExecutor(workers) as pool:
        for unit, pictures in jobs():
            pending.append((unit, pool.submit(encode, unit, pictures)))
            while len(pending) > 2 * workers:
                done, future = pending.popleft()
                strips[done] = future.result()
        for done, future in pending:
            strips[done] = future.result()
    return strips
