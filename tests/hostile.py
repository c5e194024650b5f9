"""What the hostile-input tests share: hypothesis settings, hostile values and file mutations, and the
property every reader of a stranger's file must keep — it reads the file, or it raises one DissectionError
of one line; never another exception, never a hang.

Fuzzing runs derandomized in CI (the same examples every run, so a red CI is a real regression, not luck).
To hunt for new cases locally, explore with fresh random examples, ten times as many of them:

    NETDISSECTION_FUZZ=explore pytest tests/test_hostile_*.py

and keep every case it finds as an explicit regression test.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import signal
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image

from netdissection.core.errors import DissectionError

EXPLORE = os.environ.get("NETDISSECTION_FUZZ") == "explore"

T = TypeVar("T")


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a fuzzing test of ``examples`` examples (ten times as many when exploring)."""
    return settings(
        max_examples=examples * (10 if EXPLORE else 1),
        deadline=None,  # the machine is shared: a slow example is no failure (a hang is, see ``within``)
        derandomize=not EXPLORE,
        database=None if not EXPLORE else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
        print_blob=True,
    )


class Hang(AssertionError):
    pass


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of waiting for ever) when the block takes longer than ``seconds``."""

    def alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s: a hostile file must never hang a reader")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_or_refuse(read: Callable[[], T], seconds: int = 30) -> T | DissectionError:
    """Run a reader on a hostile input: its result, or the DissectionError it raised — which must be one
    line. Any other exception fails the test (hypothesis then shrinks the input that raised it)."""
    with within(seconds):
        try:
            result = read()
        except DissectionError as exc:
            assert_one_line(exc)
            _event(f"refused: {' '.join(re.sub(r'/[^ ]*', 'PATH', str(exc)).split()[:14])}")
            return exc
    _event("read")
    return result


def _event(text: str) -> None:
    """Count outcomes in hypothesis' statistics (pytest --hypothesis-show-statistics) when fuzzing."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text.strip(), "an error without a message"
    assert "\n" not in text and "\r" not in text, f"a multi-line error: {text!r}"
    assert "Traceback" not in text, text


# ---------------------------------------------------------------------------------------------------- values

#: Cell values a stranger's table may hold where a number, a name or a path is expected.
HOSTILE_VALUES = [
    "", " ", "0", "-1", "1", "2", "65535", "65536", str(2**63), str(10**30), "1.5", "nan", "inf", "-inf", "1e308",
    "x", ".", "..", "../index.csv", "../../../etc/passwd", "/etc/passwd", "C:\\evil.png", "\\\\host\\share\\x.png",
    "images/../../x.png", "a;b", ";", ";;", "1;2;x", "img000.png;../x.png", "\x00", "é", "\ufeff", '"', "a\nb",
    "\r\n", ",", "images", "x" * 200_000,
]

hostile_value = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.text(max_size=12),
    st.integers(-(10**20), 10**20).map(str),
)


@st.composite
def mutated_table(draw: st.DrawFn, rows: list[list[str]]) -> bytes:
    """A CSV table (header first) changed the way a stranger's file may be: cells, row widths, rows, the
    encoding, truncation, flipped bytes, or nothing of it left."""
    rows = [list(r) for r in rows]
    kind = draw(st.sampled_from(["cell", "cells", "swap", "width", "rows", "truncate", "bytes", "garbage"]))
    if kind in ("cell", "cells", "swap"):
        everything = [v for r in rows for v in r]
        for _ in range(1 if kind != "cells" else draw(st.integers(2, 6))):
            i = draw(st.integers(0, len(rows) - 1))
            j = draw(st.integers(0, max(0, len(rows[i]) - 1)))
            value = draw(st.sampled_from(everything)) if kind == "swap" else draw(hostile_value)
            if rows[i]:
                rows[i][j] = value
    elif kind == "width":
        i = draw(st.integers(0, len(rows) - 1))
        if draw(st.booleans()) and rows[i]:
            rows[i].pop(draw(st.integers(0, len(rows[i]) - 1)))
        else:
            rows[i].insert(draw(st.integers(0, len(rows[i]))), draw(hostile_value))
    elif kind == "rows":
        action = draw(st.sampled_from(["drop", "duplicate", "header only", "empty", "blank lines"]))
        i = draw(st.integers(0, len(rows) - 1))
        if action == "drop":
            rows.pop(i)
        elif action == "duplicate":
            rows.insert(i, list(rows[i]))
        elif action == "header only":
            rows = rows[:1]
        elif action == "empty":
            rows = []
        else:
            rows.insert(i + 1, [])
    text = io.StringIO()
    csv.writer(text, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(rows)
    data = text.getvalue().encode("utf-8")
    if kind == "truncate":
        data = cut(draw, data)
    elif kind == "bytes":
        data = flip_bytes(draw, data)
    elif kind == "garbage":
        data = draw(st.binary(max_size=200))
    return data


def flip_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes replaced by arbitrary ones (invalid UTF-8, NULs, CRC breaks...)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        # Positions as fractions of the length: some writers (torch.save) vary the length from run to run,
        # and hypothesis needs the same draws to make the same file.
        out[draw(st.integers(0, 2**16 - 1)) * len(out) >> 16] = draw(st.integers(0, 255))
    return bytes(out)


def cut(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` cut short at an arbitrary point."""
    return data[: draw(st.integers(0, 2**16 - 1)) * len(data) >> 16]


def read_table(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ---------------------------------------------------------------------------------------------------- images

#: Every mode PIL makes that some format stores (not "La"); a label map named .png may be a TIFF, a WebP, ...:
#: PIL opens files by their content.
ALL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B", "I;16L",
             "I;16N", "LA", "PA", "RGBX", "RGBa"]
FORMATS = ["PNG", "TIFF", "BMP", "GIF", "JPEG", "PPM", "WEBP"]


def encode(image: Image.Image, formats: list[str] = FORMATS) -> bytes | None:
    for fmt in formats:
        out = io.BytesIO()
        try:
            image.save(out, format=fmt)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return out.getvalue()
    return None


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, *, depth: int = 8, color: int = 0, rows: bytes = b"",
            palette: bytes | None = None) -> bytes:
    """A PNG written by hand: any header (0×0, gigapixels), a palette or none, whatever pixel data."""
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
    if palette is not None:
        out += png_chunk(b"PLTE", palette)
    return out + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b"")


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of ``width`` × ``height`` zeros in a few kB: what a decompression bomb looks like."""
    line = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(line) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


@st.composite
def hostile_image(draw: st.DrawFn, size: tuple[int, int], ids: tuple[int, ...] = (0, 1, 2)) -> bytes:
    """The bytes of a file that should be an image of ``size`` ``(h, w)`` (a label map holding ``ids``):
    sometimes it is, mostly it is not."""
    h, w = size
    kind = draw(st.sampled_from(["valid", "mode", "size", "truncated", "flipped", "no palette", "zero",
                                 "bomb header", "garbage", "empty"]))
    values = np.array(draw(st.lists(st.sampled_from(ids), min_size=h * w, max_size=h * w)), dtype=np.uint8)
    valid = encode(Image.fromarray(values.reshape(h, w)), ["PNG"])
    assert valid is not None
    if kind == "valid":
        return valid
    if kind == "mode":
        mode = draw(st.sampled_from(ALL_MODES))
        image = Image.fromarray(values.reshape(h, w)).convert(mode) if mode not in ("I;16L", "I;16N", "RGBa",
                                                                                   "PA") else Image.new(mode, (w, h))
        data = encode(image, [draw(st.sampled_from(FORMATS)), *FORMATS])
        return data if data is not None else valid
    if kind == "size":
        hh, ww = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        return encode(Image.new("L", (ww, hh)), ["PNG"]) or valid
    if kind == "truncated":
        return cut(draw, valid)
    if kind == "flipped":
        return flip_bytes(draw, valid)
    if kind == "no palette":  # a palette image whose PLTE chunk is gone
        return raw_png(w, h, depth=8, color=3, rows=b"".join(b"\x00" + bytes(values[i * w:(i + 1) * w])
                                                            for i in range(h)))
    if kind == "zero":
        return raw_png(draw(st.sampled_from([0, w])), draw(st.sampled_from([0, h, 0])))
    if kind == "bomb header":  # declares far more than it holds
        return raw_png(draw(st.sampled_from([w, 50_000, 2**31 - 1])), draw(st.sampled_from([h, 50_000])),
                       depth=1, rows=b"\x00" * 8)
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    return b""


# ---------------------------------------------------------------------------------------------------- folders

@contextmanager
def copy_of(template: Path) -> Iterator[Path]:
    """A fresh copy of a dataset folder for one example, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        root = tmp / template.name
        shutil.copytree(template, root, symlinks=True)
        yield root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_everything(dataset: Any) -> int:
    """Every sample through the loader as a run reads it (both passes, in this process); the samples read."""
    from netdissection.core import loading

    count = 0
    for image, labels in ((True, False), (False, True)):
        for batch in loading.iterate(dataset, batch_size=2, workers=0, image=image, labels=labels, skip_bad=False):
            count += len(batch.indices)
            if batch.layers is not None:
                assert tuple(batch.layers.shape[2:]) == tuple(batch.label_shape)
                assert batch.layers.numel() == 0 or int(batch.layers.min()) >= 0
    return count
