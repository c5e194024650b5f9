"""Hostile tables: a stranger's index.csv, category.csv, label.csv, c_*.csv, concepts.csv and samples.csv.

Fuzzed (see tests/hostile.py): every mutation either reads — and then every sample loads with labels of the
declared size — or is refused with one DissectionError line. The cases fuzzing found are kept below as
plain regression tests, as are the paths a table may name (absolute, ``..``, through links that leave the
folder, FIFOs) and an index of many rows, which is streamed, not held.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
@fuzz(100)
@given(data=st.data())
def test_folder_tables_read_or_refuse(folder: Path, table: str, data: st.DataObject) -> None:
    with copy_of(folder) as root:
        (root / table).write_bytes(data.draw(mutated_table(read_table(root / table)), label=table))
        read_or_refuse(lambda: open_folder(root))
