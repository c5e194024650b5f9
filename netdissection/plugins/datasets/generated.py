"""A procedurally generated concept set in the Broden format.

It is the built-in default dataset (so the tool works offline, with nothing to download) and the fixture
generator of the tests (any size, any seed). Every image is drawn from float geometry in normalised
coordinates, rasterised once at image resolution for the JPEG and once at half resolution for the label
maps, so that the masks line up with the pixels.

Layout written (see ``generate_concept_set``)::

    index.csv  label.csv  category.csv  c_<category>.csv  README.txt
    images/gen/000000.jpg  images/gen/000000_object.png  images/gen/000000_part_1.png  ...

Label PNGs are RGB with ``number = R + 256 * G`` (B = 0), the global number of ``label.csv``; 0 means
unlabelled. The six categories are all present in any set of at least 3 images (the first images cycle
through the kinds deterministically), and every label in any set of at least 9 images of 32 px or more.
"""

from __future__ import annotations

import csv
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ...core.hookspecs import hookimpl

__all__ = ["CATEGORIES", "LABELS", "builtin_dataset", "default_concept_set", "generate_concept_set"]

log = logging.getLogger(__name__)

#: The categories of the generated set, in ``category.csv`` and ``index.csv`` column order.
CATEGORIES = ("object", "color", "material", "scene", "texture", "part")
PIXEL_CATEGORIES = ("object", "color", "material", "part")
IMAGE_CATEGORIES = ("scene", "texture")

#: Bump when the content changes, so that cached default sets of an older version are not reused.
VERSION = 1
DEFAULT_IMAGES = 300
DEFAULT_SIZE = 224
DEFAULT_SEED = 0
JPEG_QUALITY = 92

_NAMES: dict[str, tuple[str, ...]] = {
    "object": ("sky", "ground", "wall", "ball", "box", "pyramid", "car", "wheel"),
    "color": (
        "red-c",
        "orange-c",
        "yellow-c",
        "green-c",
        "blue-c",
        "purple-c",
        "pink-c",
        "brown-c",
        "white-c",
        "grey-c",
        "black-c",
    ),
    "material": ("metal", "wood", "fabric", "stone"),
    "scene": ("beach-s", "street-s", "room-s"),
    "texture": ("striped", "dotted", "checkered"),
    "part": ("wheel", "window", "hub"),
}


def _number_labels() -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """Global numbers 1..L in category order; a name in several categories (wheel) gets one number."""
    order: list[str] = []
    cats: dict[str, list[str]] = {}
    for cat in CATEGORIES:
        for name in _NAMES[cat]:
            if name not in cats:
                order.append(name)
                cats[name] = []
            cats[name].append(cat)
    return tuple((i + 1, name, tuple(cats[name])) for i, name in enumerate(order))


#: ``(number, name, categories)`` of every label of the generated set.
LABELS = _number_labels()
_NUM = {name: number for number, name, _ in LABELS}

#: Saturated, well separated palette centres; every colour region is one of them plus small noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red-c": (220, 30, 30),
    "orange-c": (245, 140, 20),
    "yellow-c": (245, 225, 40),
    "green-c": (40, 170, 50),
    "blue-c": (35, 80, 220),
    "purple-c": (130, 40, 180),
    "pink-c": (245, 120, 190),
    "brown-c": (120, 70, 30),
    "white-c": (240, 240, 240),
    "grey-c": (128, 128, 128),
    "black-c": (20, 20, 20),
}
_BRIGHT = ("red-c", "orange-c", "yellow-c", "green-c", "purple-c", "pink-c")

KINDS = ("scene", "texture", "closeup")
SCENES = ("beach-s", "street-s", "room-s")
TEXTURES = ("striped", "dotted", "checkered")
_SCENE_OBJECTS = ("ball", "box", "pyramid", "car", "wheel")
# Standalone wheels are rare and small so that wheel's part coverage (two per car) beats its object
# coverage: the reader picks a label's primary category by coverage, and wheel should be a part.
_SCENE_OBJECT_P = (0.22, 0.22, 0.2, 0.28, 0.08)
_CLOSEUP_OBJECTS = ("ball", "box", "pyramid", "car")
_CLOSEUP_OBJECT_P = (0.25, 0.25, 0.2, 0.3)
_FORCED = 9  # the first images cycle deterministically through kinds and variants
_NO_COLOR_IMAGE = 5  # a forced close-up without color annotation, so small sets have a missing category
_NO_COLOR_P = 0.1 / 0.75  # ~10% of all images: texture images (~25%) always keep their colors


# --------------------------------------------------------------------------------------------- geometry

Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A region: ``shape(x, y) -> bool mask`` for pixel-centre coordinates in [0, 1] (x a row, y a column)."""


def _disk(cx: float, cy: float, r: float) -> Shape:
    return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rect(x0: float, y0: float, x1: float, y1: float) -> Shape:
    return lambda x, y: (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def _triangle(apex: tuple[float, float], left: tuple[float, float], right: tuple[float, float]) -> Shape:
    """A filled triangle by three half-plane tests (vertices in counter-clockwise screen order)."""
    pts = (apex, left, right)

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mask = np.ones(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
        for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1], strict=True):
            mask &= (bx - ax) * (y - ay) - (by - ay) * (x - ax) <= 0
        return mask

    return inside


@dataclass(frozen=True)
class _Mask:
    """One region rasterised at image resolution (``img``) and at label resolution (``lbl``)."""

    img: np.ndarray
    lbl: np.ndarray

    def __or__(self, other: _Mask) -> _Mask:
        return _Mask(self.img | other.img, self.lbl | other.lbl)

    def __sub__(self, other: _Mask) -> _Mask:
        return _Mask(self.img & ~other.img, self.lbl & ~other.lbl)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an n×n raster, shaped to broadcast (x: 1×n, y: n×1)."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    return c[None, :], c[:, None]


# ---------------------------------------------------------------------------------------------- canvas


@dataclass
class _Canvas:
    """An image being drawn, with its label layers; later paint occludes earlier paint."""

    size: int
    rng: np.random.Generator
    # The image is kept as a region index into a colour table plus a brightness map and composed at the
    # end: painting a uint8 index is ~30x faster than painting interleaved RGB floats.
    regions: np.ndarray = field(init=False)
    brightness: np.ndarray = field(init=False)
    colours: list[np.ndarray] = field(default_factory=list)
    layers: dict[str, list[np.ndarray]] = field(init=False)
    image_labels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, m = self.size, max(1, self.size // 2)
        self.regions = np.zeros((n, n), dtype=np.uint8)
        self.brightness = np.zeros((n, n), dtype=np.float32)
        self.colours = [np.zeros(3, dtype=np.float32)]
        self.layers = {cat: [np.zeros((m, m), dtype=np.int32)] for cat in PIXEL_CATEGORIES}
        self.layers["part"].append(np.zeros((m, m), dtype=np.int32))  # layer 2: parts of parts (hub)
        self._grids = (_grid(n), _grid(m))

    def mask(self, shape: Shape) -> _Mask:
        (xi, yi), (xl, yl) = self._grids
        full_i = np.broadcast_to(shape(xi, yi), (len(yi), xi.shape[1]))
        full_l = np.broadcast_to(shape(xl, yl), (len(yl), xl.shape[1]))
        return _Mask(np.ascontiguousarray(full_i), np.ascontiguousarray(full_l))

    def everything(self) -> _Mask:
        return self.mask(lambda x, y: np.ones(np.broadcast_shapes(x.shape, y.shape), dtype=bool))

    def fill(self, mask: _Mask, colour: str, texture: np.ndarray | None = None) -> None:
        """Paint a region in a palette colour (plus a per-region shift and an optional brightness map)."""
        shift = self.rng.integers(-6, 7, size=3)  # with the final ±4 pixel noise: within ±10 of the centre
        self.colours.append(np.asarray(PALETTE[colour], dtype=np.float32) + shift)
        self.regions[mask.img] = len(self.colours) - 1  # fewer than 256 regions: a handful of objects
        np.copyto(self.brightness, 0.0 if texture is None else texture, where=mask.img)
        self.layers["color"][0][mask.lbl] = _NUM[colour]

    def label(self, category: str, mask: _Mask, name: str, layer: int = 0) -> None:
        self.layers[category][layer][mask.lbl] = _NUM[name]

    def clear(self, category: str, mask: _Mask) -> None:
        """Unlabel a region in every layer of a category (what an occluding object hides)."""
        for layer in self.layers[category]:
            layer[mask.lbl] = 0

    def finish(self) -> np.ndarray:
        out = np.take(np.stack(self.colours), self.regions, axis=0)
        out += self.brightness[..., None]
        out += self.rng.integers(-4, 5, size=out.shape, dtype=np.int8)
        np.rint(out, out=out)
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)

    # Material brightness maps, at image resolution; their periods scale with the image size.

    def _pixels(self) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(self.size)
        return idx[None, :], idx[:, None]

    def _period(self, at224: float) -> int:
        return max(2, round(at224 * self.size / 224))

    def metal(self) -> np.ndarray:
        """A fine horizontal sheen: one bright row every few rows."""
        _, row = self._pixels()
        sheen = np.where(row % self._period(3) == 0, 30.0, -6.0)
        return np.broadcast_to(sheen, (self.size, self.size)).astype(np.float32)

    def wood(self) -> np.ndarray:
        """Dark grain stripes, roughly vertical with a wobble."""
        col, row = self._pixels()
        p = self._period(7)
        phase = self.rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (col / p + 0.6 * np.sin(2 * np.pi * row / (6 * p) + phase)))
        return np.where(wave > 0.4, -35.0, 8.0).astype(np.float32)

    def fabric(self) -> np.ndarray:
        """A striped weave: alternating light/dark diagonal stripes, period ~4 px at 224."""
        col, row = self._pixels()
        half = self._period(4) / 2
        return np.where(((col + row) // half) % 2 == 0, 30.0, -30.0).astype(np.float32)

    def stone(self) -> np.ndarray:
        """Grainy speckle."""
        return np.clip(self.rng.normal(0, 16, size=(self.size, self.size)), -40, 40).astype(np.float32)


# ---------------------------------------------------------------------------------------------- objects


def _solid(canvas: _Canvas, shape: Shape) -> _Mask:
    """Occlusion: a new object hides whatever object, material and part labels were under it."""
    mask = canvas.mask(shape)
    for cat in ("object", "material", "part"):
        canvas.clear(cat, mask)
    return mask


def _draw_ball(canvas: _Canvas, cx: float, base: float, size: float, colour: str) -> None:
    r = size / 2
    mask = _solid(canvas, _disk(cx, base - r, r))
    canvas.fill(mask, colour, canvas.fabric())
    canvas.label("object", mask, "ball")
    canvas.label("material", mask, "fabric")


def _draw_box(canvas: _Canvas, cx: float, base: float, size: float, colour: str) -> None:
    mask = _solid(canvas, _rect(cx - size / 2, base - size, cx + size / 2, base))
    canvas.fill(mask, colour, canvas.wood())
    canvas.label("object", mask, "box")
    canvas.label("material", mask, "wood")


def _draw_pyramid(canvas: _Canvas, cx: float, base: float, size: float, colour: str) -> None:
    height = size * float(canvas.rng.uniform(0.6, 0.95))
    mask = _solid(canvas, _triangle((cx, base - height), (cx - size / 2, base), (cx + size / 2, base)))
    canvas.fill(mask, colour, canvas.stone())
    canvas.label("object", mask, "pyramid")
    canvas.label("material", mask, "stone")


def _draw_wheel(canvas: _Canvas, cx: float, base: float, size: float, colour: str) -> None:
    """A standalone wheel: a black tyre disk with a lighter rim disk inside; an object, no parts."""
    r = size / 2
    tyre = _solid(canvas, _disk(cx, base - r, r))
    rim = canvas.mask(_disk(cx, base - r, 0.55 * r))
    canvas.fill(tyre - rim, "black-c")
    canvas.fill(rim, colour)
    canvas.label("object", tyre, "wheel")


def _draw_car(canvas: _Canvas, cx: float, base: float, size: float, colour: str) -> None:
    """A metal body with a window and two wheels; parts: wheel and window (layer 1), hub (layer 2)."""
    w = size
    r = 0.13 * w  # wheel radius
    wy = base - r  # wheel centres sit on the bottom edge of the body
    top = wy - 0.4 * w
    body = canvas.mask(_rect(cx - w / 2, top, cx + w / 2, wy))
    window = canvas.mask(_rect(cx - 0.32 * w, top + 0.06 * w, cx + 0.32 * w, top + 0.18 * w))
    wheels = [canvas.mask(_disk(cx + dx * w, wy, r)) for dx in (-0.3, 0.3)]
    hubs = [canvas.mask(_disk(cx + dx * w, wy, 0.45 * r)) for dx in (-0.3, 0.3)]
    silhouette = body | wheels[0] | wheels[1]
    for cat in ("object", "material", "part"):
        canvas.clear(cat, silhouette)
    metal = body - window - wheels[0] - wheels[1]
    canvas.fill(metal, colour, canvas.metal())
    canvas.fill(window, "white-c")
    canvas.label("object", silhouette, "car")
    canvas.label("material", metal, "metal")
    canvas.label("part", window, "window")
    for wheel, hub in zip(wheels, hubs, strict=True):
        canvas.fill(wheel - hub, "black-c")
        canvas.fill(hub, "grey-c")
        canvas.label("part", wheel, "wheel")  # the hub is part of the wheel: wheel in layer 1 ...
        canvas.label("part", hub, "hub", layer=1)  # ... and hub in layer 2


_DRAW = {
    "ball": _draw_ball,
    "box": _draw_box,
    "pyramid": _draw_pyramid,
    "car": _draw_car,
    "wheel": _draw_wheel,
}


def _object_colour(rng: np.random.Generator, kind: str, avoid: Iterable[str] = ()) -> str:
    """The palette colour of an object, from the colours its material comes in."""
    choices = {
        "ball": _BRIGHT,
        "box": ("brown-c",),
        "pyramid": ("grey-c", "white-c", "yellow-c", "orange-c"),
        "car": ("grey-c", "blue-c"),
        "wheel": ("grey-c", "white-c"),
    }[kind]
    allowed = [c for c in choices if c not in set(avoid)] or list(choices)
    return allowed[int(rng.integers(len(allowed)))]


# ----------------------------------------------------------------------------------------------- images


def _scene_image(canvas: _Canvas, scene: str, forced: str | None) -> None:
    """A scene background (sky / wall / ground bands) with 1–3 objects standing on the ground."""
    rng = canvas.rng
    if scene == "beach-s":
        horizon = float(rng.uniform(0.35, 0.6))
        bands = [("sky", "blue-c", 0.0, horizon), ("ground", "yellow-c", horizon, 1.0)]  # sand
    elif scene == "street-s":
        sky = float(rng.uniform(0.0, 0.25)) if rng.random() < 0.7 else 0.0
        horizon = float(rng.uniform(0.55, 0.7))
        wall = ("red-c", "white-c", "pink-c")[int(rng.integers(3))]
        bands = [
            ("sky", "blue-c", 0.0, sky),
            ("wall", wall, sky, horizon),
            ("ground", "grey-c", horizon, 1.0),
        ]
    else:
        horizon = float(rng.uniform(0.6, 0.75))
        wall = ("white-c", "green-c", "pink-c", "orange-c", "purple-c")[int(rng.integers(5))]
        bands = [("wall", wall, 0.0, horizon), ("ground", "brown-c", horizon, 1.0)]  # a brown floor
    for name, colour, y0, y1 in bands:
        if y1 > y0:
            mask = canvas.mask(_rect(-1.0, y0, 2.0, y1))
            canvas.fill(mask, colour)
            canvas.label("object", mask, name)
    canvas.image_labels["scene"] = _NUM[scene]

    count = int(rng.integers(1, 4))
    kinds = [str(k) for k in rng.choice(_SCENE_OBJECTS, size=count, p=_SCENE_OBJECT_P)]
    if forced is not None:
        kinds.append(forced)  # drawn last, so nothing occludes it
    sizes = {
        "ball": (0.1, 0.3),
        "box": (0.12, 0.3),
        "pyramid": (0.15, 0.35),
        "car": (0.35, 0.65),
        "wheel": (0.08, 0.16),
    }
    for j, kind in enumerate(kinds):
        size = float(rng.uniform(*sizes[kind]))
        cx = float(rng.uniform(0.15, 0.85))
        base = float(rng.uniform(min(horizon + 0.08, 0.95), 0.97))
        if forced is not None and j == len(kinds) - 1:
            # Forced objects must show at 16×16 labels, and the forced wheel must stay smaller than the
            # forced car's wheels, so that wheel is primarily a part in any set.
            if kind == "car":
                size = 0.55 + size / 6.5  # 0.6 to 0.65
                cx, base = _snap_wheel(canvas, cx, base, size)
            else:
                size = 0.1 + size / 8  # 0.11 to 0.12: a radius over 0.707 label pixels at 16×16
        _DRAW[kind](canvas, cx, base, size, _object_colour(rng, kind, avoid=[c for _, c, _, _ in bands]))


def _snap_wheel(canvas: _Canvas, cx: float, base: float, width: float) -> tuple[float, float]:
    """Shift a car so that its left wheel centre is a label pixel centre: its hub then labels at least
    one pixel at any resolution (a forced car must show every part even in a 16×16 label map)."""
    m = max(1, canvas.size // 2)
    wx, wy = cx - 0.3 * width, base - 0.13 * width  # as in _draw_car
    return cx + (np.floor(wx * m) + 0.5) / m - wx, base + (np.floor(wy * m) + 0.5) / m - wy


def _closeup_image(canvas: _Canvas, kind: str) -> None:
    """One large object on a plain background that is not labelled as any object."""
    rng = canvas.rng
    colour = _object_colour(rng, kind)
    backgrounds = [c for c in PALETTE if c not in (colour, "black-c", "brown-c", "grey-c")]
    canvas.fill(canvas.everything(), backgrounds[int(rng.integers(len(backgrounds)))])
    size = float(
        rng.uniform(
            *{"ball": (0.5, 0.75), "box": (0.45, 0.7), "pyramid": (0.55, 0.8), "car": (0.7, 0.9)}[kind]
        )
    )
    cx = 0.5 + float(rng.uniform(-0.08, 0.08))
    base = {"car": 0.5 + 0.26 * size}.get(kind, 0.5 + size / 2) + float(rng.uniform(-0.05, 0.05))
    _DRAW[kind](canvas, cx, base, size, colour)


def _texture_image(canvas: _Canvas, texture: str, colours: tuple[str, ...] = ()) -> None:
    """A frame-filling two-colour pattern, with color labels and an image-level texture label."""
    rng = canvas.rng
    drawn = [str(c) for c in rng.choice([c for c in PALETTE if c not in colours], size=2, replace=False)]
    first, second = (*colours, *drawn)[:2]
    phase = float(rng.uniform(0, 1))
    if texture == "striped":
        angle = float(rng.choice([0.0, 0.25, 0.5, 0.75])) * np.pi
        period = float(rng.uniform(0.1, 0.2))
        ca, sa = np.cos(angle), np.sin(angle)

        def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return np.floor((x * ca + y * sa) / period + phase) % 2 == 1

    elif texture == "dotted":
        period = float(rng.uniform(0.12, 0.22))
        radius = period * float(rng.uniform(0.22, 0.35))

        def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            dx = (x / period + phase) % 1 - 0.5
            dy = (y / period + phase) % 1 - 0.5
            return dx * dx + dy * dy <= (radius / period) ** 2

    else:
        period = float(rng.uniform(0.1, 0.25))

        def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return (np.floor(x / period + phase) + np.floor(y / period + phase)) % 2 == 1

    everything = canvas.everything()
    marked = canvas.mask(pattern)
    canvas.fill(everything - marked, first)
    canvas.fill(marked, second)
    canvas.image_labels["texture"] = _NUM[texture]


@dataclass(frozen=True)
class _Plan:
    """What image ``i`` shows: its kind and variant, what is forced into it, and whether colors are kept."""

    kind: str
    variant: str
    forced_object: str | None = None  # a scene object drawn last and large enough to survive at any size
    colours: tuple[str, ...] = ()  # forced texture colours
    has_color: bool = True


# Colours the forced scenes and close-ups do not already guarantee, spread over the forced textures.
_FORCED_TEXTURE_COLOURS = (("red-c", "orange-c"), ("green-c", "purple-c"), ("pink-c",))


def _plan(i: int, rng: np.random.Generator) -> _Plan:
    """The plan of image ``i``.

    The first ``_FORCED`` images cycle through kinds and variants so that any small set has every
    category and every label: image 0 is a street with a car, 3 a beach with a wheel, 6 a room; 1, 4, 7
    are the three textures in the colours that the scenes do not show; 2, 5, 8 close-ups of ball, box,
    pyramid, and image 5 has no color annotation.
    """
    if i < _FORCED:
        kind, turn = KINDS[i % 3], i // 3
        if kind == "scene":
            return _Plan(
                kind, ("street-s", "beach-s", "room-s")[turn], forced_object={0: "car", 1: "wheel"}.get(turn)
            )
        if kind == "texture":
            return _Plan(kind, TEXTURES[turn], colours=_FORCED_TEXTURE_COLOURS[turn])
        return _Plan(kind, ("ball", "box", "pyramid")[turn], has_color=i != _NO_COLOR_IMAGE)
    kind = str(rng.choice(KINDS, p=(0.5, 0.25, 0.25)))
    if kind == "scene":
        variant = SCENES[int(rng.integers(len(SCENES)))]
    elif kind == "texture":
        variant = TEXTURES[int(rng.integers(len(TEXTURES)))]
    else:
        variant = str(rng.choice(_CLOSEUP_OBJECTS, p=_CLOSEUP_OBJECT_P))
    return _Plan(kind, variant, has_color=kind == "texture" or rng.random() >= _NO_COLOR_P)


@dataclass
class _Rendered:
    """One generated image: pixels, label layers that are annotated, image-level labels."""

    rgb: np.ndarray
    layers: dict[str, list[np.ndarray]]
    image_labels: dict[str, int]


def _render(i: int, size: int, seed: int) -> _Rendered:
    # One generator per image, seeded by (seed, i): image i does not depend on how many images there are.
    rng = np.random.default_rng([seed, i])
    plan = _plan(i, rng)
    canvas = _Canvas(size, rng)
    if plan.kind == "scene":
        _scene_image(canvas, plan.variant, plan.forced_object)
    elif plan.kind == "texture":
        _texture_image(canvas, plan.variant, plan.colours)
    else:
        _closeup_image(canvas, plan.variant)
    rgb = canvas.finish()
    layers: dict[str, list[np.ndarray]] = {}
    for cat, stack in canvas.layers.items():
        if cat == "color" and not plan.has_color:
            continue
        if cat != "color" and plan.kind == "texture":
            continue  # texture images are annotated with colors and their texture only
        kept = [layer for layer in stack if layer.any()]
        if kept:
            layers[cat] = kept
    return _Rendered(rgb, layers, dict(canvas.image_labels))


# ------------------------------------------------------------------------------------------------ output


def _encode(labels: np.ndarray) -> Image.Image:
    """A label map as Broden's RGB PNG: R = number % 256, G = number // 256, B = 0."""
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = (labels >> 8) & 0xFF
    return Image.fromarray(rgb, "RGB")


@dataclass
class _Counts:
    """Frequency (images) and covered pixels (in label-map pixels; image-level labels count a whole map)."""

    frequency: dict[int, int] = field(default_factory=dict)
    pixels: dict[int, int] = field(default_factory=dict)

    def add(self, number: int, pixels: int) -> None:
        self.frequency[number] = self.frequency.get(number, 0) + 1
        self.pixels[number] = self.pixels.get(number, 0) + pixels


def _covered(stack: list[np.ndarray]) -> dict[int, int]:
    """Pixels per label over a stack of layers (a pixel counts once per label, whatever its layers)."""
    layers = np.stack(stack)
    return {int(n): int(np.any(layers == n, axis=0).sum()) for n in np.unique(layers) if n != 0}


def _fmt(value: float) -> str:
    return repr(round(value, 6))


def _write_csv(path: pathlib.Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(list(header))
        writer.writerows(rows)


def _write_set(folder: pathlib.Path, images: int, size: int, seed: int) -> None:
    """Render and write every image and the CSV files into ``folder`` (which exists and is empty)."""
    (folder / "images" / "gen").mkdir(parents=True)
    m = max(1, size // 2)
    area = m * m
    width = max(6, len(str(images - 1)))
    per_cat = {cat: _Counts() for cat in CATEGORIES}
    overall = _Counts()
    annotated = dict.fromkeys(CATEGORIES, 0)
    index_rows = []
    for i in range(images):
        stem = f"gen/{i:0{width}d}"
        item = _render(i, size, seed)
        Image.fromarray(item.rgb, "RGB").save(folder / "images" / f"{stem}.jpg", quality=JPEG_QUALITY)
        cells = dict.fromkeys(CATEGORIES, "")
        for cat, stack in item.layers.items():
            names = (
                [f"{stem}_{cat}.png"]
                if len(stack) == 1 and cat != "part"
                else [f"{stem}_{cat}_{k + 1}.png" for k in range(len(stack))]
            )
            for name, layer in zip(names, stack, strict=True):
                _encode(layer).save(folder / "images" / name)
            cells[cat] = ";".join(names)
            for number, pixels in _covered(stack).items():
                per_cat[cat].add(number, pixels)
        for cat, number in item.image_labels.items():
            cells[cat] = str(number)
            per_cat[cat].add(number, area)
            overall.add(number, area)
        if item.layers:
            for number, pixels in _covered([layer for s in item.layers.values() for layer in s]).items():
                overall.add(number, pixels)
        for cat in CATEGORIES:
            annotated[cat] += bool(cells[cat])
        index_rows.append([f"{stem}.jpg", "train", size, size, m, m, *(cells[c] for c in CATEGORIES)])

    label_rows: list[list[object]] = [[0, "-", "-", 0, "0.0", ""]]
    for number, name, cats in LABELS:
        membership = ";".join(f"{cat}({per_cat[cat].frequency.get(number, 0)})" for cat in cats)
        label_rows.append(
            [
                number,
                name,
                membership,
                overall.frequency.get(number, 0),
                _fmt(overall.pixels.get(number, 0) / area),
                "",
            ]
        )
    _write_csv(
        folder / "label.csv", ("number", "name", "category", "frequency", "coverage", "syns"), label_rows
    )

    category_rows = []
    for cat in CATEGORIES:
        members = [(number, name) for number, name, cats in LABELS if cat in cats]
        category_rows.append([cat, 1, len(members), len(members), annotated[cat]])
        counts = per_cat[cat]
        _write_csv(
            folder / f"c_{cat}.csv",
            ("code", "number", "name", "frequency", "coverage"),
            [
                [
                    code,
                    number,
                    name,
                    counts.frequency.get(number, 0),
                    _fmt(counts.pixels.get(number, 0) / area),
                ]
                for code, (number, name) in enumerate(members, start=1)
            ],
        )
    _write_csv(folder / "category.csv", ("name", "first", "last", "count", "frequency"), category_rows)
    (folder / "README.txt").write_text(
        f"Concept set generated by netdissection.plugins.datasets.generated (version {VERSION}): "
        f"images={images} image_size={size} seed={seed}. Broden format; label maps are half size.\n",
        encoding="utf-8",
    )
    # index.csv last: it is what marks a folder as a complete dataset.
    _write_csv(folder / "index.csv", ("image", "split", "ih", "iw", "sh", "sw", *CATEGORIES), index_rows)


def generate_concept_set(
    root: str | os.PathLike[str],
    *,
    images: int = DEFAULT_IMAGES,
    image_size: int = DEFAULT_SIZE,
    seed: int = 0,
) -> pathlib.Path:
    """Generate a Broden-format concept set of ``images`` images of ``image_size``² pixels into ``root``.

    The output is a deterministic function of ``(images, image_size, seed)``: byte-identical files.
    It is built in a hidden sibling folder and renamed into place at the end, so an interrupted run never
    leaves a complete-looking ``root``. Raises ``FileExistsError`` if ``root`` already holds a dataset
    (an ``index.csv``) or anything else; an existing empty folder is replaced.
    """
    if images < 1 or image_size < 2:
        raise ValueError(f"need images >= 1 and image_size >= 2, got {images} and {image_size}")
    root = pathlib.Path(root)
    _check_free(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    try:
        _write_set(tmp, images, image_size, seed)
        _check_free(root)
        if root.is_dir():
            root.rmdir()  # empty (checked above); renaming over a folder is not portable
        try:
            os.rename(tmp, root)
        except OSError as err:  # another generator finished first
            if (root / "index.csv").exists():
                raise FileExistsError(f"a concept set already exists at {root}") from err
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_free(root: pathlib.Path) -> None:
    if (root / "index.csv").exists():
        raise FileExistsError(f"a concept set already exists at {root}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder")


def _cache_root() -> pathlib.Path:
    from ...core.files import cache_root

    return cache_root()


def default_concept_set(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """The built-in concept set (300 images of 224², seed 0), generated once into the cache folder.

    ``cache_dir`` defaults to ``$NETDISSECTION_CACHE``, else ``$XDG_CACHE_HOME/netdissection``, else
    ``~/.cache/netdissection``.
    """
    folder = pathlib.Path(cache_dir) if cache_dir is not None else _cache_root()
    root = folder / f"builtin-concepts-v{VERSION}-{DEFAULT_SIZE}-{DEFAULT_IMAGES}-s{DEFAULT_SEED}"
    if (root / "index.csv").exists():
        return root
    log.info(
        "generating the built-in concept set (%d images of %d px) in %s", DEFAULT_IMAGES, DEFAULT_SIZE, root
    )
    try:
        generate_concept_set(root, images=DEFAULT_IMAGES, image_size=DEFAULT_SIZE, seed=DEFAULT_SEED)
    except FileExistsError:
        if not (root / "index.csv").exists():
            raise  # something else is in the way, not a concurrent generator's result
    return root


def builtin_identity() -> dict[str, Any]:
    """What the built-in set's bytes depend on: the generator's version, its parameters, and the Pillow that
    encodes its JPEGs (a job key uses this instead of reading the set, which may not be generated yet)."""
    import PIL

    return {"generator": VERSION, "images": DEFAULT_IMAGES, "size": DEFAULT_SIZE, "seed": DEFAULT_SEED,
            "jpeg_quality": JPEG_QUALITY, "pillow": PIL.__version__}


def builtin_dataset(path: object = None, categories: Sequence[str] | None = None, **options: object) -> Any:
    """The ``builtin`` dataset format: the generated default set, read as the Broden folder it is."""
    from .broden import BrodenDataset

    root = default_concept_set()
    log.info("No --dataset: using the built-in concept set of %d generated images", DEFAULT_IMAGES)
    log.debug("built-in concept set: %s (pass --dataset PATH for Broden or your own data)", root)
    return BrodenDataset(root, categories, **options)


@hookimpl
def dissect_register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    register("builtin", builtin_dataset, identity=builtin_identity,
             description="the generated concept set used when no --dataset is given (300 images, 6 categories)")
