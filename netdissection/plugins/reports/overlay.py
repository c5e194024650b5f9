"""A unit's mask drawn on an image: the thresholded, upsampled activation map, dimmed outside, outlined.

Everything here works on numpy arrays, so the pixels the report shows can be checked exactly before
they are scaled and JPEG-encoded. The upsampling is the protocol's (bilinear, half-pixel centres,
clamped edges: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``) in float64,
with the same operations in the same order as :mod:`netdissection.core.upsample`; the mask is strict:
``upsampled > threshold``.

Speed matters (a 512-unit layer with 10 images per unit is 5,120 overlays): the map is upsampled only
inside the window of output rows and columns whose source cells hold a value above the threshold (a
bilinear value is a convex combination of its cell's corners, so nothing outside can pass), and the
mask is drawn only inside its bounding box.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: Pixels outside the mask keep ``DIM_LEVEL / 256`` of their brightness: ``(value * DIM_LEVEL) >> 8``.
DIM_LEVEL = 72
#: The outline is drawn on the mask's own edge pixels, so everything outside the mask is only dimmed.
OUTLINE_RGB = (255, 214, 0)


@lru_cache(maxsize=64)
def _axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: lower and upper source index, and the weights of the lower corner (1 − w) and of
    the upper corner (w) (torch's rule)."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    # At a clamped edge both corners are the same value: weight 0 keeps the pixel exactly that value.
    weight = np.where(upper == lower, 0.0, src - lower)
    arrays = (lower, upper, 1 - weight, weight)
    for array in arrays:
        array.flags.writeable = False  # cached and shared: nobody may change them
    return arrays


def _interpolate(a: np.ndarray, rows: slice, cols: slice, size: tuple[int, int]) -> np.ndarray:
    """The upsampling of ``a`` (..., h, w) to ``size``, at output rows ``rows`` and columns ``cols`` only.

    Along x first, then along y: per pixel ``top = c00·(1−wx) + c01·wx``, ``bottom`` likewise, then
    ``top·(1−wy) + bottom·wy`` — the arithmetic of :func:`netdissection.core.upsample.active_pixels`.
    """
    y0, y1, vy, wy = (v[rows] for v in _axis(a.shape[-2], size[0]))
    x0, x1, vx, wx = (v[cols] for v in _axis(a.shape[-1], size[1]))
    across = a[..., x0] * vx + a[..., x1] * wx  # (..., h, W)
    # The same operations in place: no temporaries of the output's size beyond the two gathered rows.
    values = across[..., y0, :]
    values *= vy[:, None]
    bottom = across[..., y1, :]
    bottom *= wy[:, None]
    values += bottom
    return values


def upsample_bilinear(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``raw`` ``(..., h, w)`` upsampled to ``size`` = ``(H, W)`` in float64, like torch's bilinear."""
    return _interpolate(np.asarray(raw, dtype=np.float64), slice(None), slice(None), size)


def _window(hot: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> slice | None:
    """Output positions whose source cell touches a hot source index (as one range), or None."""
    touched = np.flatnonzero(hot[lower] | hot[upper])
    return slice(int(touched[0]), int(touched[-1]) + 1) if touched.size else None


def unit_mask(raw: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Where the unit fires on an image of ``size`` = ``(H, W)``: its raw map ``(h, w)`` upsampled, strictly
    above its threshold. Equal to ``upsample_bilinear(raw, size) > threshold``, computed in a window."""
    mask = np.zeros(size, dtype=bool)
    boxed = boxed_mask(raw, threshold, size)
    if boxed is not None:
        box, inside = boxed
        mask[box] = inside
    return mask


def boxed_mask(raw: np.ndarray, threshold: float, size: tuple[int, int]
               ) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The mask of :func:`unit_mask` as its :func:`bounding_box` and the mask inside that box (None when the
    mask is empty), without the whole image's mask: a strip draws only the box."""
    a = np.asarray(raw, dtype=np.float64)
    hot = a > threshold
    rows = _window(hot.any(axis=1), *_axis(a.shape[0], size[0])[:2])
    cols = _window(hot.any(axis=0), *_axis(a.shape[1], size[1])[:2])
    if rows is None or cols is None:
        return None
    window = _interpolate(a, rows, cols, size) > threshold
    ys, xs = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
    if ys.size == 0:
        return None
    tight = window[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    # The box in image coordinates, grown by a pixel as bounding_box grows it: what it gains is outside the mask.
    top, left = rows.start + int(ys[0]), cols.start + int(xs[0])
    box = (slice(max(top - 1, 0), min(top + tight.shape[0] + 1, size[0])),
           slice(max(left - 1, 0), min(left + tight.shape[1] + 1, size[1])))
    inside = np.zeros((box[0].stop - box[0].start, box[1].stop - box[1].start), dtype=bool)
    y, x = top - box[0].start, left - box[1].start
    inside[y:y + tight.shape[0], x:x + tight.shape[1]] = tight
    return box, inside


def erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; the image border does not erode (a mask touching it has no edge there)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's edge: mask pixels within ``width`` steps of a pixel outside the mask."""
    inner = mask
    for _ in range(max(1, width)):
        inner = erode(inner)
    return mask & ~inner


def dim(image: np.ndarray) -> np.ndarray:
    """The image at ``DIM_LEVEL / 256`` brightness: ``(value * DIM_LEVEL) >> 8`` per channel."""
    return ((image.astype(np.uint16) * DIM_LEVEL) >> 8).astype(np.uint8)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The mask's bounding box grown by one pixel (so the box's own border is outside the mask)."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return slice(max(int(ys[0]) - 1, 0), int(ys[-1]) + 2), slice(max(int(xs[0]) - 1, 0), int(xs[-1]) + 2)


def draw_overlay(image: np.ndarray, mask: np.ndarray, outline_width: int = 1) -> np.ndarray:
    """``image`` (RGB uint8 ``(H, W, 3)``) with the area outside ``mask`` dimmed and its edge drawn in yellow."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    out = dim(image)
    box = bounding_box(mask)
    if box is not None:
        inside, region = mask[box], out[box]
        np.copyto(region, image[box], where=inside[..., None])
        region[outline(inside, outline_width)] = OUTLINE_RGB
    return out


def unit_overlay(image: np.ndarray, raw: np.ndarray, threshold: float, outline_width: int = 1) -> np.ndarray:
    """The overlay of one top image of a unit: its raw map ``(h, w)`` upsampled to the image, thresholded
    (strictly), drawn."""
    return draw_overlay(image, unit_mask(raw, threshold, image.shape[:2]), outline_width)
