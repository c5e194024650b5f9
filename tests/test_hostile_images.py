"""Hostile images and label maps: every PIL mode, other formats behind a .png name, wrong sizes, truncated
files, flipped bytes, a palette image without its palette, 0×0 headers, and decompression bombs.

Fuzzed through the Broden and the folder readers (the two ways a label file reaches the decoder): each file
reads, with labels of the declared size, or is refused with one DissectionError line naming it. Bombs are
refused from their header, before a pixel is decoded.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from netdissection.core.errors import DissectionError
from netdissection.core.limits import MAX_IMAGE_PIXELS, MAX_LABEL_PIXELS
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.folder_dataset import FolderDataset
from netdissection.plugins.datasets.labelmaps import decode_labels, decode_rgb, read_size

from .concept_folders import make_folder
from .hostile import (
    ALL_MODES,
    FORMATS,
    bomb_png,
    copy_of,
    encode,
    fuzz,
    hostile_image,
    load_everything,
    raw_png,
    read_or_refuse,
)
from .random_broden import write_random_broden

#: Label files of the Broden template: an object map, a part map (second layer), a color map.
BRODEN_LABELS = ["img000_object.png", "img000_part_2.png", "img001_color.png"]
FOLDER_LABELS = ["masks/0_objects.png", "masks/0_colours.png", "masks/1.png"]


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_broden(tmp_path_factory.mktemp("template") / "broden", images=2, image_size=8, label_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("template") / "folder")


def _labels_read(dataset: BrodenDataset | FolderDataset) -> None:
    load_everything(dataset)


@fuzz(200)
@given(name=st.sampled_from([*BRODEN_LABELS, "img001.png"]), data=st.data())
def test_broden_label_and_image_files_read_or_refuse(broden: Path, name: str, data: st.DataObject) -> None:
    size = (8, 8) if name == "img001.png" else (4, 4)
    with copy_of(broden) as root:
        (root / "images" / name).write_bytes(data.draw(hostile_image(size, ids=(0, 1, 2, 4, 5)), label=name))
        outcome = read_or_refuse(lambda: _labels_read(BrodenDataset(root)))
        if isinstance(outcome, DissectionError):
            assert name in str(outcome)  # the file is named


@fuzz(200)
@given(name=st.sampled_from([*FOLDER_LABELS, "images/2.png"]), data=st.data())
def test_folder_label_and_image_files_read_or_refuse(folder: Path, name: str, data: st.DataObject) -> None:
    size = (8, 8) if name.startswith("images") else (4, 4)
    with copy_of(folder) as root:
        (root / name).write_bytes(data.draw(hostile_image(size, ids=(0, 1, 2, 3)), label=name))
        outcome = read_or_refuse(lambda: _labels_read(FolderDataset(root)))
        if isinstance(outcome, DissectionError):
            assert Path(name).name in str(outcome) or "samples.csv" in str(outcome)


# ------------------------------------------------------------------------------------- regressions and modes

@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_pil_mode_reads_or_is_refused(broden: Path, folder: Path, mode: str) -> None:
    """Each mode, in every format that stores it, as a Broden label, a folder label map and an image."""
    stored = 0
    for fmt in FORMATS:
        for make, root_of, name, size in ((BrodenDataset, broden, "images/img000_object.png", 4),
                                          (FolderDataset, folder, "masks/1.png", 4),
                                          (FolderDataset, folder, "images/0.png", 8)):
            data = encode(Image.new(mode, (size, size)), [fmt])
            if data is None:
                continue
            stored += 1
            with copy_of(root_of) as root:
                (root / name).write_bytes(data)
                read_or_refuse(lambda: _labels_read(make(root)))  # noqa: B023
    assert stored, f"no format stores {mode}"


def test_a_palette_image_without_its_palette_reads_as_indices(folder: Path) -> None:
    """PIL reads a P-mode PNG whose PLTE chunk is missing; its indices are the ids, as with one."""
    ids = np.array([[0, 1, 2, 0]] * 4, dtype=np.uint8)
    rows = b"".join(b"\x00" + bytes(r) for r in ids)
    assert decode_labels(raw_png(4, 4, color=3, rows=rows), "map").tolist() == ids.tolist()


@pytest.mark.parametrize("size", [(0, 0), (0, 4), (4, 0)])
def test_zero_sized_images_are_refused(size: tuple[int, int]) -> None:
    with pytest.raises(DissectionError, match="the map is corrupt"):
        decode_labels(raw_png(*size), "the map")
    with pytest.raises(DissectionError, match="the image is corrupt"):
        decode_rgb(raw_png(*size), "the image")


def test_pil_errors_beyond_oserror_are_one_line() -> None:
    """Truncations PIL reports as SyntaxError, struct.error, EOFError or ValueError, not only OSError."""
    valid = encode(Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)), ["PNG"])
    assert valid is not None
    for cut in range(len(valid)):
        read_or_refuse(lambda: decode_labels(valid[:cut], "the map"))  # noqa: B023
    tiff = encode(Image.new("I;16", (4, 4)), ["TIFF"])
    assert tiff is not None
    for cut in range(0, len(tiff), 3):
        read_or_refuse(lambda: decode_labels(tiff[:cut], "the map"))  # noqa: B023


# --------------------------------------------------------------------------------------------------- bombs

def test_a_gigapixel_label_png_of_a_few_kb_is_refused_from_its_header(tmp_path: Path) -> None:
    """40,000 × 40,000 one-bit zeros in a few kB: refused by name, before decoding (fast, no memory)."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(40_000, 40_000))
    assert bomb.stat().st_size < 250_000
    tracemalloc.start()
    started = time.perf_counter()
    for read in (decode_labels, decode_rgb, read_size):
        with pytest.raises(DissectionError) as caught:
            read(bomb, f"label map {bomb}")
        assert f"label map {bomb} declares" in str(caught.value) and "1.6 gigapixels" in str(caught.value)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - started < 5 and peak < 50e6


def test_pils_own_limit_and_ours_give_the_same_message(tmp_path: Path) -> None:
    """Above twice PIL's setting PIL raises first; between ours and PIL's ours does; both read alike, and
    PIL's DecompressionBombWarning never reaches the user as a second line."""
    import warnings

    big = raw_png(20_000, 20_000, depth=1)  # 400 Mpx: PIL's own error
    middle = raw_png(10_000, 10_000, depth=1)  # 100 Mpx: over the image limit, under PIL's error
    small = raw_png(5_000, 4_000, depth=1)  # 20 Mpx: an image may, a label map may not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data, reader in ((big, decode_rgb), (middle, decode_rgb), (small, decode_labels)):
            with pytest.raises(DissectionError, match=r"the file declares .*megapixels\)?, more than the limit of"):
                reader(data, "the file")
        assert read_size(small, "the file") == (4_000, 5_000)
    assert MAX_LABEL_PIXELS < 20e6 < MAX_IMAGE_PIXELS < 100e6


def test_broden_bombs_and_sizes_are_checked_before_decoding(broden: Path) -> None:
    """A label file whose header disagrees with index.csv is refused from its header alone: a truncated
    file with a wrong size says so, not that it is corrupt (the data was never read)."""
    with copy_of(broden) as root:
        wrong = encode(Image.new("RGB", (5, 4)), ["PNG"])
        assert wrong is not None
        header = wrong[: wrong.index(b"IDAT") + 6]  # the header chunks, then two bytes of pixel data
        (root / "images" / "img000_object.png").write_bytes(header)
        with pytest.raises(DissectionError, match=r"img000_object\.png is 4×5 \(h×w\) but index.csv says 4×4"):
            BrodenDataset(root).load(0)
        (root / "images" / "img000_object.png").write_bytes(bomb_png(5_000, 4_000))
        with pytest.raises(DissectionError, match=r"label image .*img000_object\.png declares 5000×4000 pixels"):
            BrodenDataset(root).load(0)
        (root / "images" / "img001.png").write_bytes(bomb_png(12_000, 12_000))
        with pytest.raises(DissectionError, match=r"image .*img001\.png declares 12000×12000 pixels \(144\.0 meg"):
            BrodenDataset(root).load(1)


def test_index_csv_cannot_declare_gigapixels(broden: Path) -> None:
    with copy_of(broden) as root:
        index = root / "index.csv"
        lines = index.read_text().splitlines()
        lines[1] = lines[1].replace(",8,8,4,4,", ",8,8,40000,40000,", 1)
        index.write_text("\n".join(lines) + "\n")
        with pytest.raises(DissectionError, match=r"index\.csv line 2: sh×sw declares 40000×40000 pixels"):
            BrodenDataset(root)


def test_folder_first_label_map_cannot_set_a_gigapixel_label_size(folder: Path) -> None:
    with copy_of(folder) as root:
        (root / "masks" / "0_objects.png").write_bytes(bomb_png(40_000, 40_000))
        with pytest.raises(DissectionError, match=r"0_objects\.png declares 1\.6 gigapixels, more than the limit"):
            FolderDataset(root)
