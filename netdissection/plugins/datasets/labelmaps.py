"""Reading and writing images and label maps, shared by every concept dataset plugin.

One decoder for every format means a sample is the same array whichever format carried it: the
dataset formats differ in where files are listed, never in how pixels are read.

Label map encodings (PIL modes) and how they read:

- ``L`` (8-bit), ``I;16`` / ``I;16B`` / ``I`` (16/32-bit grayscale), ``P`` (palette index, as Pascal VOC),
  ``1`` (binary): the pixel value is the label id.
- ``RGB``: Broden's encoding, id = R + 256·G (blue unused).

Ids run from 0 (unlabelled) to :data:`MAX_ID`.

Every reader here checks what a file declares before it decodes it: its pixel count against
``core.limits`` (a few-kB PNG can declare gigapixels) and, when the dataset says what size it must be,
that size — so a wrong or hostile file costs a header read, and its error names it.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...core.errors import DissectionError
from ...core.limits import MAX_IMAGE_PIXELS, MAX_LABEL_PIXELS, check_pixels, too_many_pixels

#: The largest label id: what a 16-bit grayscale or a Broden RGB (R + 256·G) label map can hold.
MAX_ID = 65535

#: PIL modes whose pixel value is the label id.
VALUE_MODES = ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "P", "1")
LABEL_MODES = (*VALUE_MODES, "RGB")

Source = Path | bytes
T = TypeVar("T")


def _open(source: Source) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _quietly(read: Callable[..., T]) -> Callable[..., T]:
    """PIL warns about what it finds odd in a stranger's file (corrupt EXIF data, a large header): the
    readers read the file or refuse it in one line, and a warning printed beside would only add lines."""

    @functools.wraps(read)
    def quiet(*args: Any, **kwargs: Any) -> T:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read(*args, **kwargs)

    return quiet


def _problem(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image file"
    text = str(exc).split(": '/")[0].strip(" :'").splitlines()
    return text[0] if text and text[0] else type(exc).__name__


def _opened(source: Source, what: str, limit: int) -> Image.Image:
    """The image with its header read and its declared size within ``limit``; nothing decoded yet.

    Any exception PIL raises on a stranger's bytes (OSError, SyntaxError, struct.error, EOFError, ...)
    means the file is corrupt, whatever its type: PIL's decoders do not agree on one.
    """
    try:
        im = _open(source)
    except FileNotFoundError:
        raise DissectionError(f"{what} is missing") from None
    except Image.DecompressionBombError as exc:
        # PIL's own limit (twice its process-wide setting) fired before the header could be checked here.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_many_pixels(what, int(declared.group(1)) if declared else Image.MAX_IMAGE_PIXELS or 0,
                              limit) from None
    except Exception as exc:
        raise DissectionError(f"{what} is corrupt: {_problem(exc)}") from None
    try:
        check_pixels(im.size[1], im.size[0], what, limit)
    except DissectionError:
        im.close()
        raise
    return im


@_quietly
def _decode(source: Source, what: str, limit: int, expected: tuple[int, int] | None, expected_by: str,
            read: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open ``source``, check its declared size (``limit``, then ``expected``) before decoding, then decode
    it with ``read``; every failure is one line naming ``what``."""
    with _opened(source, what, limit) as im:
        if expected is not None and (im.size[1], im.size[0]) != tuple(expected):
            raise DissectionError(f"{what} is {im.size[1]}×{im.size[0]} (h×w) but {expected_by} "
                                  f"{expected[0]}×{expected[1]}")
        try:
            im.load()
            return read(im)
        except DissectionError:
            raise
        except MemoryError:
            raise DissectionError(f"{what} does not fit in memory when decoded") from None
        except Exception as exc:
            raise DissectionError(f"{what} is corrupt: {_problem(exc)}") from None


@_quietly
def read_size(source: Source, what: str, limit: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(h, w)`` from the file header only (nothing is decoded), within ``limit`` pixels."""
    with _opened(source, what, limit) as im:
        return im.size[1], im.size[0]


@_quietly
def read_format(source: Source) -> str:
    """A file suffix for an encoded image (``.jpg``, ``.png``, ...), from its header."""
    with _open(source) as im:
        fmt = (im.format or "png").lower()
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")


def decode_rgb(source: Source, what: str, expected: tuple[int, int] | None = None,
               expected_by: str = "the dataset says") -> np.ndarray:
    """An image → RGB uint8 ``(H, W, 3)``; ``what`` names it in errors (a path, or a row and column).
    ``expected`` ``(h, w)``, when known, is checked against the header before anything is decoded."""
    return _decode(source, what, MAX_IMAGE_PIXELS, expected, expected_by, lambda im: np.asarray(im.convert("RGB")))


def label_values(im: Image.Image) -> np.ndarray:
    """The label ids of an opened label map as int64 ``(h, w)``; raises ValueError for other modes."""
    if im.mode == "RGB":
        rgb = np.asarray(im)
        return rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64)
    if im.mode in VALUE_MODES:
        return np.asarray(im).astype(np.int64)
    raise ValueError(f"its mode is {im.mode}; label maps are 8/16-bit grayscale (L, I;16), palette (P) "
                     "or Broden RGB (id = R + 256·G)")


def decode_labels(source: Source, what: str, expected: tuple[int, int] | None = None,
                  expected_by: str = "the dataset says") -> np.ndarray:
    """A label map → int64 ``(h, w)`` ids. Ids outside 0..MAX_ID are an error here: no reader can keep them."""

    def read(im: Image.Image) -> np.ndarray:
        try:
            return label_values(im)
        except ValueError as exc:
            raise DissectionError(f"{what} cannot be read as a label map: {exc}") from None

    values = _decode(source, what, MAX_LABEL_PIXELS, expected, expected_by, read)
    if values.size and (values.min() < 0 or values.max() > MAX_ID):
        raise DissectionError(f"{what} holds ids outside 0..{MAX_ID}")
    return values


def decode_broden_labels(source: Source, what: str, expected: tuple[int, int] | None = None,
                         expected_by: str = "the dataset says") -> np.ndarray:
    """A Broden label PNG → int32 ``(h, w)`` label numbers, R + 256·G of the image converted to RGB
    (Broden's own files are RGB; other modes read as PIL converts them, as the original tools did)."""

    def read(im: Image.Image) -> np.ndarray:
        rgb = np.asarray(im.convert("RGB"))
        return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)

    return _decode(source, what, MAX_LABEL_PIXELS, expected, expected_by, read)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 RGB, uint8 gray or uint16 gray array."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def encode_broden_rgb(labels: np.ndarray) -> bytes:
    """Broden's label PNG: R = id % 256, G = id // 256, B = 0."""
    labels = np.asarray(labels, dtype=np.int64)
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = (labels >> 8) & 0xFF
    return encode_png(rgb)


def encode_gray(labels: np.ndarray, max_id: int) -> bytes:
    """A grayscale label PNG: 8-bit when every id of the vocabulary fits (readable in any viewer), else 16-bit."""
    labels = np.asarray(labels)
    if max_id <= 255:
        return encode_png(labels.astype(np.uint8))
    return encode_png(labels.astype(np.uint16))


def selection_table(known_ids: np.ndarray, selected_ids: Sequence[int]) -> np.ndarray:
    """A lookup table over every possible id: the id itself when its concept is selected, 0 for a concept
    of an unselected category (read as unlabelled), -1 for an id that is no concept (an error to report)."""
    table = np.full(MAX_ID + 1, -1, dtype=np.int32)
    table[0] = 0
    table[known_ids] = 0
    selected = np.asarray(list(selected_ids), dtype=np.int64)
    table[selected] = selected
    return table
