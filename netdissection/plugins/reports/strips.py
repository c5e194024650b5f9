"""Each unit's top images as one JPEG strip: the overlays of its top-k images side by side.

One file per unit (not per image) keeps a 512-unit layer at 512 small files and one ``<img>`` per card:
the page loads fast, JPEG headers are paid once per strip, and NetDissect's readers know the look.
The images come from the run's concept dataset; the raw maps and thresholds from the run's results,
so no model runs again.

Speed (a 512-unit layer is 5,120 thumbnails; a run's reports should take seconds): the strips are made in
worker processes on every core; each top image is decoded and dimmed once for all the units that show it;
and for each unit only the pixels inside its mask's box are drawn, the rest of a tile being the dimmed image
shrunk once. :func:`render_strip` gives the same pixels as drawing each overlay whole (:func:`unit_overlays`,
what the tests check exactly) and shrinking it (:func:`compose_strip`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import DissectionError
from ...core.types import LayerResult
from .overlay import OUTLINE_RGB, boxed_mask, dim, outline, unit_overlay

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

GAP = 2  # pixels between tiles
BACKGROUND = (34, 34, 34)
#: An RGB pixel's 3 bytes as one NumPy value, and the outline colour as one.
PIXEL = np.dtype("V3")
_OUTLINE_PIXEL = np.array(OUTLINE_RGB, dtype=np.uint8).view(PIXEL)[0]


@dataclass(frozen=True)
class Strip:
    """A written strip: its file, its size in pixels, and the (dataset index, peak) of each tile."""

    path: Path
    width: int
    height: int
    tiles: tuple[tuple[int, float], ...]


#: How much an image cache may grow after its preload, in each worker process that inherited it.
PER_WORKER_BYTES = 64 << 20


class ImageSource:
    """Dataset images by index, decoded once and kept within a budget in bytes (top images repeat across
    units, and decoding is a good part of the work), with what every overlay of the image starts from: the
    image dimmed and shrunk to its tile, computed once. The dimmed image itself is not kept: a strip needs it
    only inside its masks' boxes, where dimming those pixels is cheaper than keeping a second full-size copy
    of every top image (the reports' share of a run's peak memory).

    Nothing kept is ever dropped: once the budget is spent, an image (or tile) not kept is made again where
    it is needed. The images kept first — by :meth:`preload`, those most units show — are the ones worth
    keeping; dropping the least recently used instead would throw those out for images one or two units show.
    """

    def __init__(self, dataset: Any, budget_bytes: int = 128 << 20) -> None:
        self.dataset = dataset
        self.budget = budget_bytes
        self._cache: dict[int, dict[object, np.ndarray]] = {}
        self._bytes = 0

    def _entry(self, index: int) -> dict[object, np.ndarray]:
        entry = self._cache.get(index)
        if entry is not None:
            return entry
        sample = self.dataset.load(index, image=True, labels=False)
        entry = {"image": np.ascontiguousarray(sample.image, dtype=np.uint8)}
        if self._admit(entry["image"]):
            self._cache[index] = entry
        return entry

    def _derived(self, index: int, key: object, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        entry = self._entry(index)
        value = entry.get(key)
        if value is None:
            value = make(entry["image"])
            if index in self._cache and self._admit(value):
                entry[key] = value
        return value

    def _admit(self, array: np.ndarray) -> bool:
        """Whether ``array`` fits in what is left of the budget (then counted in it)."""
        if self._bytes + array.nbytes > self.budget:
            return False
        self._bytes += array.nbytes
        return True

    def __call__(self, index: int) -> np.ndarray:
        return self._entry(index)["image"]

    def __contains__(self, index: object) -> bool:
        """Whether the image is decoded and kept."""
        return index in self._cache

    def dimmed_shrunk(self, index: int, factor: int) -> np.ndarray:
        """The image as the overlays show it outside a mask (:func:`~.overlay.dim`), shrunk by an integer
        ``factor`` as a strip shrinks it (``reduce``)."""
        return self._derived(index, ("dimmed", factor), lambda image: shrink(dim(image), factor))

    def preload(self, indices: Iterable[int]) -> None:
        """Decode these images now, in this order, as many as the budget holds, before worker processes fork:
        they share these pages. Each worker has its own copy of this cache, which may then grow by
        ``PER_WORKER_BYTES`` (the tiles of the images it draws, first). An image that cannot be read is left for
        the strips that show it to report."""
        for index in indices:
            if index in self._cache:
                continue
            with suppress(DissectionError, OSError):
                self(index)
                if index not in self._cache:
                    break  # the budget is spent
        self.budget = self._bytes + PER_WORKER_BYTES


def shrink(pixels: np.ndarray, factor: int) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 shrunk by an integer factor that divides H and W: each output pixel the
    average of a factor×factor block, exactly as Pillow's ``reduce`` (what :func:`scale_to` shrinks a tile
    with) computes it."""
    if factor == 1:
        return pixels
    if factor == 2:  # Pillow's 2×2 reduce is (sum + 2) >> 2; in NumPy, 5x faster on the small boxes drawn here
        total = np.add(pixels[0::2, 0::2], pixels[1::2, 0::2], dtype=np.uint16)  # in place from here on
        total += pixels[0::2, 1::2]
        total += pixels[1::2, 1::2]
        total += 2
        total >>= 2
        return total.astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).reduce(factor))


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
    return overlays, _tiles(layer, unit, pictures)


def _tiles(layer: LayerResult, unit: int, pictures: list[Picture]) -> tuple[tuple[int, float], ...]:
    assert layer.top_images is not None
    return tuple((index, float(layer.top_images.scores[unit, slot])) for slot, index, _image in pictures)


def _integer_factor(shapes: list[tuple[int, ...]], square: int) -> int | None:
    """The factor every image shrinks by when all have one shape that shrinks to its tile by an exact integer
    factor (1: kept as is), else None."""
    if any(shape[:2] != shapes[0][:2] for shape in shapes):
        return None
    h, w = shapes[0][:2]
    size = fit(shapes[0], square)
    factor = w // size[0]
    if factor < 1 or (w, h) != (size[0] * factor, size[1] * factor):
        return None
    return factor


def _aligned(box: tuple[slice, slice], factor: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """``box`` grown to whole factor×factor blocks (it stays inside the image: factor divides its size)."""
    rows, cols = box
    return (slice(rows.start - rows.start % factor, min(shape[0], -(-rows.stop // factor) * factor)),
            slice(cols.start - cols.start % factor, min(shape[1], -(-cols.stop // factor) * factor)))


def render_strip(layer: LayerResult, unit: int, pictures: list[Picture], tile: int,
                 images: ImageSource | None = None) -> Image.Image:
    """The strip of a unit's top images: :func:`compose_strip` of their overlays, pixel for pixel.

    When every image has one shape that shrinks to the tile by an integer factor (224 px images in 112 px
    tiles, the usual case), each pixel of a tile is the average of a block of overlay pixels. Outside the
    mask's bounding box (grown by a pixel: the outline's neighbours) the overlay is the dimmed image, so those
    blocks are the dimmed image shrunk, the same for every unit that shows the image (``images`` keeps it);
    only the blocks of the box are drawn and shrunk for the unit.
    """
    from PIL import Image

    assert layer.top_images is not None
    shapes = [image.shape for _slot, _index, image in pictures]
    square = tile_size(shapes, tile)
    factor = _integer_factor(shapes, square)
    if factor is None:
        overlays, _ = _overlays(layer, unit, pictures, tile)
        return compose_strip(overlays, square)
    top, threshold = layer.top_images, float(layer.thresholds[unit])
    n = len(pictures)
    width, height = fit(shapes[0], square)
    x0, y0 = (square - width) // 2, (square - height) // 2
    strip = _background(square, n * square + (n - 1) * GAP).copy()
    for i, (slot, index, image) in enumerate(pictures):
        view = strip[y0:y0 + height, i * (square + GAP) + x0:][:, :width]
        np.copyto(view, shrink(dim(image), factor) if images is None else images.dimmed_shrunk(index, factor))
        boxed = boxed_mask(top.maps[unit, slot], threshold, image.shape[:2])
        if boxed is None:
            continue
        # What draw_overlay does inside the box, on the box grown to whole blocks (still no mask on its border).
        box, in_box = boxed
        rows, cols = _aligned(box, factor, image.shape)
        inside = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
        inside[box[0].start - rows.start:box[0].stop - rows.start,
               box[1].start - cols.start:box[1].stop - cols.start] = in_box
        # The image inside the mask, dimmed outside: dimmed + (image − dimmed)·inside, which never wraps
        # (dimming only darkens), 3x faster than a copy with a broadcast mask.
        base = dim(image[rows, cols])  # dimming is per pixel: the box's pixels alone
        drawn = np.subtract(image[rows, cols], base)
        drawn *= inside[..., None]
        drawn += base
        # The outline painted with each pixel's 3 bytes as one value: a 2-D mask, 4x faster than 3 channels.
        drawn.view(PIXEL)[..., 0][outline(inside, outline_width(image.shape, square))] = _OUTLINE_PIXEL
        view[rows.start // factor:rows.stop // factor, cols.start // factor:cols.stop // factor] = \
            shrink(drawn, factor)
    return Image.fromarray(strip)


@lru_cache(maxsize=8)
def _background(height: int, width: int) -> np.ndarray:
    """An empty strip, to copy (filling an RGB array with a colour is ~20x slower than copying one)."""
    strip = np.empty((height, width, 3), dtype=np.uint8)
    strip[...] = BACKGROUND
    strip.flags.writeable = False
    return strip


#: Units per task of the process pool: enough to pay for the task's round trip, few enough to balance.
UNITS_PER_TASK = 16


@dataclass(frozen=True)
class StripJob:
    """The strips of one layer, to be written into ``folder``."""

    layer: LayerResult
    folder: Path


def write_strips(jobs: Sequence[StripJob], images: Callable[[int], np.ndarray], *, tile: int, quality: int,
                 top_k: int | None, workers: int | None = None) -> list[dict[int, Strip] | Exception]:
    """Write ``unit0001.jpg``... (units 1-based, as in tally.csv) into each job's folder; per job, its strips by
    unit index, or the error (a :class:`DissectionError` or ``OSError``, e.g. an image gone bad) that stopped
    them: a layer's failure costs only that layer's strips.

    The top images are decoded first, here (an :class:`ImageSource` keeps them, within its budget, for all
    the units that share them); then units go in chunks to worker processes, one per core, all layers in one
    pool (:mod:`.parallel`). The workers inherit the decoded images, dim and shrink each once, draw and encode
    their strips, and send back only what the page needs of each. ``workers``: at most this many
    processes (1: all here).
    """
    from .parallel import run_tasks

    source = images if isinstance(images, ImageSource) else None

    def encode(job: StripJob, units: range) -> list[tuple[int, Strip]] | Exception:
        layer, done = job.layer, []
        digits = max(4, len(str(layer.units)))
        try:
            for unit in units:
                pictures = [(slot, index, images(index)) for slot, index in unit_tiles(layer, unit, top_k)]
                if not pictures:
                    continue
                strip = render_strip(layer, unit, pictures, tile, source)
                path = job.folder / f"unit{unit + 1:0{digits}d}.jpg"
                # No optimize=True: twice the encoding time for 5% smaller files, and the same pixels.
                strip.save(path, format="JPEG", quality=quality)
                done.append((unit, Strip(path, strip.width, strip.height, _tiles(layer, unit, pictures))))
        except (DissectionError, OSError) as exc:
            return exc
        return done

    tasks: list[tuple[int, range]] = []
    for j, job in enumerate(jobs):
        job.folder.mkdir(parents=True, exist_ok=True)
        tasks += [(j, range(start, min(job.layer.units, start + UNITS_PER_TASK)))
                  for start in range(0, job.layer.units, UNITS_PER_TASK)]
    if source is not None:  # decoded once here, and shared by the workers, rather than once in each
        started = time.perf_counter()
        # The images most units show first: within the budget, the preload then saves the most decoding.
        wanted = Counter(index for job in jobs for unit in range(job.layer.units)
                         for _slot, index in unit_tiles(job.layer, unit, top_k))
        source.preload(index for index, _units in wanted.most_common())
        log.debug("strips: %d of the %d top images decoded in %.2f s", sum(index in source for index in wanted),
                  len(wanted), time.perf_counter() - started)
    outcomes = run_tasks([lambda j=j, units=units: encode(jobs[j], units) for j, units in tasks], workers)
    results: list[dict[int, Strip] | Exception] = [{} for _ in jobs]
    for (j, _units), outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, Exception) or isinstance(results[j], Exception):
            results[j] = results[j] if isinstance(results[j], Exception) else outcome
        else:
            results[j].update(outcome)  # type: ignore[union-attr]
    return results


def write_layer_strips(layer: LayerResult, images: Callable[[int], np.ndarray], folder: Path, *,
                       tile: int, quality: int, top_k: int | None, workers: int | None = None
                       ) -> dict[int, Strip]:
    """The strips of one layer (:func:`write_strips`); raises what stopped them."""
    (outcome,) = write_strips([StripJob(layer, folder)], images, tile=tile, quality=quality, top_k=top_k,
                              workers=workers)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
