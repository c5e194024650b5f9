"""What a stranger's file may cost: the limits every reader checks before it decodes, inflates or allocates.

Datasets, archives and checkpoints come from strangers. A few kB on disk can declare gigapixels (a PNG of
one colour), terabytes (a zip of zeros) or a tensor the size of the disk; each reader compares what a file
*declares* — an image header, a zip's central directory, index.csv's sizes — with these limits first, and
refuses with one line naming the file, before a byte is decoded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from .errors import DissectionError

#: The most pixels an image may declare: PIL's own warning level (``Image.MAX_IMAGE_PIXELS``, a quarter
#: gigabyte of 24-bit RGB, about 9,500 × 9,500), above any photograph a concept set holds and far below what a
#: decompression bomb declares. PIL itself only warns up to twice that and raises beyond; the process-wide
#: setting belongs to whoever imported PIL, so the readers apply this limit themselves, per file.
MAX_IMAGE_PIXELS = 89_478_485

#: The most pixels a label map may declare (4,096 × 4,096). A batch holds its label layers as int64 and
#: every unit's map is upsampled to the label resolution, so a label map costs far more than an image of the
#: same size; real label maps (Broden 112–192 px, ADE20K, Cityscapes' 2,048 × 1,024) are well under it.
MAX_LABEL_PIXELS = 4096 * 4096

#: The most a zip archive may inflate: each large member, and the archive as a whole, to at most this many
#: times its compressed size. Images and label PNGs are compressed already (about 1×), CSV tables 5–20×,
#: a checkpoint is stored (1×); a zip bomb inflates a thousandfold.
MAX_INFLATION = 100

#: Members smaller than this are not held to MAX_INFLATION one by one (a small table of repeated commas
#: compresses well and costs nothing); the archive as a whole still is.
SMALL_MEMBER = 1 << 20


def _gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e9:.1f} gigapixels" if pixels >= 1e9 else f"{pixels / 1e6:.1f} megapixels"


def too_many_pixels(what: str, pixels: int, limit: int, size: tuple[int, int] | None = None) -> DissectionError:
    """The refusal of a file that declares ``pixels`` (``size`` ``(h, w)`` when known), more than ``limit``."""
    declared = f"{size[1]}×{size[0]} pixels ({megapixels(pixels)})" if size else megapixels(pixels)
    return DissectionError(f"{what} declares {declared}, more than the limit of {megapixels(limit)}: a "
                           "decompression bomb, or an image to resize")


def check_pixels(height: int, width: int, what: str, limit: int) -> None:
    """Refuse a declared size with more than ``limit`` pixels, naming ``what`` (the file)."""
    if height * width > limit:
        raise too_many_pixels(what, height * width, limit, (height, width))


def check_inflation(archive: zipfile.ZipFile, path: Path, what: str) -> int:
    """Refuse the zip ``archive`` (the file ``path``, named ``what`` in the message) when its members declare
    more than MAX_INFLATION times their compressed size; return the declared unpacked size. What zipfile
    then reads is held to these declared sizes (and CRCs)."""
    members = archive.infolist()
    total = sum(m.file_size for m in members)
    for info in members:
        if info.file_size > SMALL_MEMBER and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
            raise DissectionError(
                f"{what} is a zip bomb: its member {info.filename!r} inflates {info.compress_size:,} "
                f"bytes to {info.file_size:,} ({info.file_size // max(info.compress_size, 1):,}×, more than "
                f"{MAX_INFLATION}×); refused")
    stored = path.stat().st_size
    if total > MAX_INFLATION * max(stored, SMALL_MEMBER):
        raise DissectionError(
            f"{what} is a zip bomb: its {len(members):,} members inflate {stored:,} bytes to "
            f"{_gb(total)} (more than {MAX_INFLATION}×); refused")
    return total


def check_free_space(needed: int, folder: Path, what: str) -> None:
    """Refuse to write ``needed`` bytes into ``folder`` when its disk has less free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DissectionError(f"{what} needs {_gb(needed)} but {folder} has {_gb(free)} free; free some space or "
                              "pick another destination")
