"""Hostile tables: a stranger's index.csv, category.csv, label.csv, c_*.csv, concepts.csv and samples.csv.

Fuzzed (see tests/hostile.py): every mutation either reads — and then every sample loads with labels of the
declared size — or is refused with one DissectionError line. The cases fuzzing found are kept below as
plain regression tests, as are the paths a table may name (absolute, ``..``, through links that leave the
folder, FIFOs) and an index of many rows, which is streamed, not held.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netdissection.core.errors import DissectionError
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.folder_dataset import FolderDataset
from netdissection.plugins.datasets.labelmaps import MAX_ID

from .concept_folders import make_folder
from .hostile import copy_of, fuzz, load_everything, mutated_table, read_or_refuse, read_table
from .random_broden import write_random_broden


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Broden folder: 4 images, every category, part labels in two layers, image-level labels."""
    return write_random_broden(tmp_path_factory.mktemp("template") / "broden", images=4, image_size=8, label_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("template") / "folder")


def open_broden(root: Path) -> int:
    dataset = BrodenDataset(root)
    for concept in dataset.vocabulary.concepts:  # label arrays are sized by the largest number
        assert 1 <= concept.number <= MAX_ID
    return load_everything(dataset)


def open_folder(root: Path) -> int:
    return load_everything(FolderDataset(root))


@pytest.mark.parametrize("table", ["index.csv", "category.csv", "label.csv", "c_object.csv", "c_scene.csv"])
@fuzz(100)
@given(data=st.data())
def test_broden_tables_read_or_refuse(broden: Path, table: str, data: st.DataObject) -> None:
    with copy_of(broden) as root:
        (root / table).write_bytes(data.draw(mutated_table(read_table(root / table)), label=table))
        read_or_refuse(lambda: open_broden(root))


@pytest.mark.parametrize("table", ["concepts.csv", "samples.csv"])
@fuzz(150)
@given(data=st.data())
def test_folder_tables_read_or_refuse(folder: Path, table: str, data: st.DataObject) -> None:
    with copy_of(folder) as root:
        (root / table).write_bytes(data.draw(mutated_table(read_table(root / table)), label=table))
        read_or_refuse(lambda: open_folder(root))


# ------------------------------------------------------------------------------------------- found by fuzzing

def _write(path: Path, text: str | bytes) -> None:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


def _replace_line(path: Path, number: int, line: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(("table", "content", "needle"), [
    # Each of these ended in a traceback before (UnicodeDecodeError, TypeError, ValueError, KeyError, csv.Error).
    ("index.csv", b"\x80mage,split,ih,iw,sh,sw\n", "index.csv line 1 is not UTF-8 text"),
    ("c_scene.csv", "code,number,,name,frequency,coverage\n1,12,street-s,1,1.0\n", "does not have the header's"),
    ("label.csv", "number,name,category,frequency,coverage,syns\nx,car,object(1),1,1.0,\n", "the number is 'x'"),
    ("category.csv", "first,last\n1,2\n", "category.csv is malformed: its header lacks the column(s) name"),
    ("label.csv", "number,name\n" + "1," + "x" * 200_000 + "\n", "label.csv line 2 is no CSV: field larger than"),
    ("c_object.csv", "code,number,name,frequency,coverage\n1,4,car,1,nan\n", "the coverage 'nan' is not a number"),
    ("c_object.csv", f"code,number,name,frequency,coverage\n1,{10**12},car,1,1\n", f"number {10**12} is outside"),
    ("category.csv", "name\n../../etc\n", "'../../etc' is not a category name"),
    ("category.csv", "name\nobject\nobject\n", "the category object is already on line 2"),
    ("category.csv", "name\n", "category.csv lists no categories"),
])
def test_broden_table_regressions(broden: Path, table: str, content: str | bytes, needle: str) -> None:
    with copy_of(broden) as root:
        _write(root / table, content)
        outcome = read_or_refuse(lambda: open_broden(root))
        assert isinstance(outcome, DissectionError) and needle in str(outcome), outcome


@pytest.mark.parametrize(("line", "needle"), [
    ('"a\nb",train,8,8,4,4,,,,,,', "'a\\nb' holds a control character"),  # was a two-line error
    ("img000.png,train,8,8,4,4,,,,99999999999999999999,,", "the scene label 99999999999999999999 is outside"),
    ("img000.png,train,8,8,4,4,,,,-3,,", "the scene label -3 is outside"),
    ("img000.png,train,8,8,0,4,,,,,,", "sh is 0; sizes are at least 1"),
    ("img000.png,train,16,16,4,4,,,,,,", "images 16×16 and labels 4×4 (h×w), but line 2 says 8×8"),
    ("/etc/hostname,train,8,8,4,4,,,,,,", "the file name '/etc/hostname' is absolute"),
    ("img000.png,train,8,8,4,4,../../img000_object.png,,,,,", "climbs out of the folder with '..'"),
    ("img000.png,train,8,8,4,4,C:\\x.png,,,,,", "'C:\\\\x.png' is absolute"),
    ("img000.png,train,8,8,4,4,,,,,", "line 3: expected 12 fields, found 11"),
])
def test_index_csv_regressions(broden: Path, line: str, needle: str) -> None:
    with copy_of(broden) as root:
        _replace_line(root / "index.csv", 3, line)
        outcome = read_or_refuse(lambda: open_broden(root))
        assert isinstance(outcome, DissectionError) and needle in str(outcome), outcome
        assert "index.csv" in str(outcome)


def test_a_line_longer_than_any_row_is_refused_without_reading_it_whole(broden: Path) -> None:
    with copy_of(broden) as root:
        with (root / "index.csv").open("ab") as f:
            f.write(b"x" * (3 << 20))  # 3 MB without a newline
        outcome = read_or_refuse(lambda: open_broden(root))
        assert isinstance(outcome, DissectionError) and "line 6 is longer than 1,048,576 bytes" in str(outcome)


def test_folder_tables_that_are_no_utf8_are_one_line(folder: Path) -> None:
    with copy_of(folder) as root:
        _write(root / "samples.csv", b"image,masks\n\xff\xfe.png,\n")
        outcome = read_or_refuse(lambda: open_folder(root))
        assert isinstance(outcome, DissectionError) and "samples.csv is not UTF-8 text" in str(outcome)


# ------------------------------------------------------------------------------------------------------ paths

def test_a_link_out_of_the_folder_is_refused(broden: Path, tmp_path: Path) -> None:
    """An image and a label map that are links to files elsewhere; a folder that is a link elsewhere."""
    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(broden / "images" / "img000.png", outside / "photo.png")
    shutil.copy(broden / "images" / "img000_object.png", outside / "labels.png")
    for name, target in (("img000.png", outside / "photo.png"), ("img000_object.png", outside / "labels.png")):
        with copy_of(broden) as root:
            (root / "images" / name).unlink()
            (root / "images" / name).symlink_to(target)
            outcome = read_or_refuse(lambda: open_broden(root))
            assert isinstance(outcome, DissectionError), name
            assert f"images/{name} leads outside the dataset folder" in str(outcome)
            assert str(target) in str(outcome)
    with copy_of(broden) as root:
        (root / "images" / "img000.png").rename(outside / "img000.png")
        (root / "images" / "sub").symlink_to(outside, target_is_directory=True)
        first = read_table(root / "index.csv")[1]
        _replace_line(root / "index.csv", 2, ",".join(["sub/img000.png", *first[1:]]))
        outcome = read_or_refuse(lambda: open_broden(root))
        assert isinstance(outcome, DissectionError) and "sub/img000.png leads outside" in str(outcome)


def test_links_inside_the_folder_and_a_linked_folder_are_fine(broden: Path, tmp_path: Path) -> None:
    with copy_of(broden) as root:
        (root / "images" / "img000_color.png").unlink()
        (root / "images" / "img000_color.png").symlink_to(root / "images" / "img001_color.png")
        (tmp_path / "link").symlink_to(root, target_is_directory=True)
        assert open_broden(tmp_path / "link") == 2 * 4


def test_a_fifo_in_the_folder_is_refused_not_waited_on(broden: Path, folder: Path) -> None:
    with copy_of(broden) as root:
        (root / "images" / "img001_part_1.png").unlink()
        os.mkfifo(root / "images" / "img001_part_1.png")
        outcome = read_or_refuse(lambda: open_broden(root), seconds=20)
        assert isinstance(outcome, DissectionError) and "img001_part_1.png is a FIFO" in str(outcome)
    with copy_of(folder) as root:
        (root / "masks" / "1.png").unlink()
        os.mkfifo(root / "masks" / "1.png")
        outcome = read_or_refuse(lambda: open_folder(root), seconds=20)
        assert isinstance(outcome, DissectionError) and "masks/1.png is a FIFO" in str(outcome)


def test_folder_links_out_are_refused_by_the_reader_and_the_validator(folder: Path, tmp_path: Path) -> None:
    from netdissection.plugins.datasets.folder_validate import validate_folder

    (tmp_path / "secret.png").write_bytes((folder / "masks" / "1.png").read_bytes())
    with copy_of(folder) as root:
        (root / "masks" / "1.png").unlink()
        (root / "masks" / "1.png").symlink_to(tmp_path / "secret.png")
        outcome = read_or_refuse(lambda: open_folder(root))
        assert isinstance(outcome, DissectionError) and "masks/1.png leads outside the dataset folder" in str(outcome)
        problems = [str(p) for p in validate_folder(root).problems]
        assert any(p.startswith("masks/1.png: leads outside the dataset folder") for p in problems), problems


@pytest.mark.parametrize("value", ["/etc/hostname", "../outside.png", "images/../../outside.png", "C:\\x.png"])
def test_folder_samples_csv_paths_stay_inside(folder: Path, value: str) -> None:
    with copy_of(folder) as root:
        _replace_line(root / "samples.csv", 4, f"{value},,striped")
        outcome = read_or_refuse(lambda: open_folder(root))
        assert isinstance(outcome, DissectionError) and "must be relative to the folder" in str(outcome)


# ------------------------------------------------------------------------------------------- a long index.csv

def test_index_csv_is_streamed_not_held(broden: Path) -> None:
    """200,000 rows open in memory that does not grow with parsed rows: only each row's offset is kept (8
    bytes a row; parsed rows cost about 680 bytes each, 6.8 GB for ten million). Rows load from the file."""
    rows = 200_000
    with copy_of(broden) as root:
        lines = (root / "index.csv").read_text().splitlines()
        with (root / "index.csv").open("w") as f:
            f.write(lines[0] + "\n")
            body = "\n".join(lines[1 + i % 4] for i in range(1000)) + "\n"
            for _ in range(rows // 1000):
                f.write(body)
        tracemalloc.start()
        dataset = BrodenDataset(root)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(dataset) == rows
        assert peak < 20 * rows, f"{peak / rows:.0f} bytes a row"
        assert dataset.row(rows - 1) == dataset.row(3) and dataset.row(1) != dataset.row(2)
        sample = dataset.load(rows - 3)
        assert sample.layers is not None and sample.layers.shape[1:] == (4, 4)
