"""The folder format, and the promise that a concept set is the same set in every format: the generated set
as Broden, as a folder, as a saved HuggingFace dataset and written back as Broden gives identical tallies."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netdissection.core import loading
from netdissection.core.errors import DissectionError, UnknownNameError
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.folder_dataset import FolderDataset, is_folder
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.plugins.datasets.hf_dataset import HFDataset

from .concept_folders import LABEL_SIZE, label_maps, make_folder, write_png


@pytest.fixture
def mine(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "mine")


def test_reads_every_label_encoding(mine: Path) -> None:
    ds = FolderDataset(mine)
    assert ds.vocabulary.categories == ("object", "part", "color", "scene", "texture")  # concepts.csv order
    assert [(c.number, c.name, c.category) for c in ds.vocabulary.concepts] == [
        (1, "sky", "object"), (2, "car", "object"), (3, "wheel", "part"), (5, "beach", "scene"),
        (6, "striped", "texture"), (300, "red", "color")]
    assert len(ds) == 3
    maps = label_maps()
    first = ds.load(0)
    np.testing.assert_array_equal(first.image, np.asarray(Image.open(mine / "images/0.png")))
    assert first.layers.dtype == np.int32 and first.label_shape == LABEL_SIZE
    for layer, name in zip(first.layers, ["masks/0_objects.png", "masks/0_parts.png", "masks/0_colours.png"],
                           strict=True):
        np.testing.assert_array_equal(layer, maps[name])
    assert first.image_labels == (5,)  # by name
    second = ds.load(1, image=False)
    assert second.image is None and second.image_labels == (5, 6)  # by id
    np.testing.assert_array_equal(second.layers[0], maps["masks/1.png"])
    third = ds.load(2)
    assert third.layers.shape == (0, *LABEL_SIZE) and third.image_labels == (6,)  # the set's label resolution


def test_selecting_categories_blanks_the_others(mine: Path) -> None:
    ds = FolderDataset(mine, categories=["part", "object"])
    assert ds.vocabulary.categories == ("object", "part")
    sample = ds.load(1)
    assert sample.image_labels == ()
    np.testing.assert_array_equal(sample.layers[0], np.where(label_maps()["masks/1.png"] == 2, 2, 0))
    with pytest.raises(UnknownNameError, match=r"'colour'.*'color'"):
        FolderDataset(mine, categories=["colour"])


def test_detected_and_opened_through_the_catalog(mine: Path) -> None:
    from netdissection.api import resolve_dataset
    from netdissection.registry import build_host

    assert is_folder(mine) and not is_folder(mine / "images")
    assert isinstance(resolve_dataset(build_host(entry_points=False), str(mine), None, None), FolderDataset)


def test_pickles_small_and_loads_the_same_in_a_worker(mine: Path) -> None:
    ds = FolderDataset(mine)
    ds.load(0)  # builds the id table, which must not travel to the workers
    assert len(pickle.dumps(ds)) < 5_000
    batches = list(loading.iterate(ds, batch_size=2, workers=1, image=True, labels=True, skip_bad=False))
    assert [int(i) for b in batches for i in b.indices] == [0, 1, 2]
    np.testing.assert_array_equal(batches[0].layers[0, :3].numpy(), ds.load(0).layers)
    np.testing.assert_array_equal(batches[0].images[1].numpy(), ds.load(1).image)


def test_open_errors_name_the_file_and_the_validator(mine: Path) -> None:
    (mine / "samples.csv").unlink()
    with pytest.raises(DissectionError, match=r"samples\.csv: is missing.*dissect data validate"):
        FolderDataset(mine)
    with pytest.raises(DissectionError, match="--split does not apply"):
        FolderDataset(mine, split="train")


def test_unknown_id_in_a_label_map_stops_loading(mine: Path) -> None:
    write_png(mine / "masks/1.png", np.full(LABEL_SIZE, 9), "L")
    ds = FolderDataset(mine)
    with pytest.raises(DissectionError, match=r"masks/1\.png holds ids \[9\] that are not in concepts\.csv"):
        ds.load(1)


# ------------------------------------------------------------------------------ the same set in every format


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The generated set as Broden, converted by the CLI to the folder and HF formats, and back to Broden."""
    from netdissection.cli import main

    root = tmp_path_factory.mktemp("formats")
    broden = generate_concept_set(root / "broden", images=16, image_size=64, seed=0)
    for args in ([broden, root / "folder", "--format", "folder"], [broden, root / "hf", "--format", "hf"],
                 [root / "folder", root / "broden-again"]):
        try:
            main(["data", "convert", *map(str, args)])
        except SystemExit as exc:  # main exits only on errors
            pytest.fail(f"dissect data convert {args} exited with {exc.code}")
    return {"broden": str(broden), "folder": str(root / "folder"), "hf": f"hf:{root / 'hf'}",
            "broden-again": str(root / "broden-again")}


def test_every_format_reads_the_same_samples(formats: dict[str, str]) -> None:
    broden = BrodenDataset(formats["broden"])
    others = [FolderDataset(formats["folder"]), HFDataset(formats["hf"])]
    key = [(c.number, c.name, c.category) for c in broden.vocabulary.concepts]
    for ds in others:
        assert ds.vocabulary.categories == broden.vocabulary.categories
        assert [(c.number, c.name, c.category) for c in ds.vocabulary.concepts] == key
        for i in range(len(broden)):
            a, b = broden.load(i), ds.load(i)
            np.testing.assert_array_equal(a.image, b.image)
            assert a.image_labels == b.image_labels and a.label_shape == b.label_shape
            np.testing.assert_array_equal(np.stack([x for x in a.layers if x.any()]), b.layers)


@pytest.mark.parametrize("compat", ["paper", "lite"])
def test_identical_tallies_in_every_format(formats: dict[str, str], tmp_path: Path, compat: str) -> None:
    import torch
    import torchvision

    import netdissection

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    tallies = {}
    for name, dataset in formats.items():
        out = tmp_path / name
        netdissection.dissect(model, dataset=dataset, out=out, layers=["layer2"], workers=0, compat=compat,
                              reporters=["tally"])
        tallies[name] = (out / "layer2" / "tally.csv").read_bytes()
    assert tallies["broden"].count(b"\n") == 129  # header + 128 units
    for name, tally in tallies.items():
        assert tally == tallies["broden"], name
