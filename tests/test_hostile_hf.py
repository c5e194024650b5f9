"""Hostile HuggingFace datasets: a ``save_to_disk`` folder written here with missing, odd or lying columns —
no image column, images that are strings or hostile bytes or paths to a FIFO, label columns of floats,
strings and nested lists, ClassLabel values past the class names, ids no concept names, a concepts file
that is itself hostile, features in dataset_info.json that disagree with the Arrow data.

Each one opens and loads every sample, or is refused with one DissectionError line.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from netdissection.core.errors import DissectionError
from netdissection.plugins.datasets.hf_dataset import HFDataset

from .hostile import fuzz, hostile_image, hostile_value, load_everything, mutated_table, read_or_refuse

#: How an Image column lies in the Arrow files. The fuzzed datasets are saved with this plain struct and
#: declared ``Image`` in dataset_info.json afterwards: ``save_to_disk`` would read (and embed) the files an
#: Image value names — a FIFO would block the test itself — while a stranger's folder can name anything.
IMAGE_STRUCT = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
IMAGE = {"_type": "Image"}

CONCEPTS = [["id", "name", "category"], ["1", "car", "object"], ["2", "road", "object"], ["3", "wheel", "part"]]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths an image value may name: a real image, a folder, a FIFO, nothing."""
    root = tmp_path_factory.mktemp("places")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "real.png")
    os.mkfifo(root / "fifo.png")
    return {"real": str(root / "real.png"), "folder": str(root), "fifo": str(root / "fifo.png"),
            "nothing": str(root / "nothing.png")}


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@st.composite
def image_value(draw: st.DrawFn, places: dict[str, str], size: tuple[int, int], ids: tuple[int, ...]) -> Any:
    kind = draw(st.sampled_from(["bytes"] * 5 + ["hostile", "path", "none", "empty"]))
    if kind == "bytes":
        return {"bytes": _png(np.zeros((*size, 3) if ids == () else size, dtype=np.uint8)), "path": None}
    if kind == "hostile":
        return {"bytes": draw(hostile_image(size, ids=ids or (0, 1))), "path": None}
    if kind == "path":
        return {"bytes": None, "path": places[draw(st.sampled_from(sorted(places)))]}
    return None if kind == "none" else {"bytes": b"", "path": None}


#: A label column: its feature, and a strategy for one row's value.
def label_column(draw: st.DrawFn, places: dict[str, str], rows: int) -> tuple[Any, list[Any]]:
    kind = draw(st.sampled_from(["mask"] * 3 + ["masks", "classes", "classes", "class list", "ids", "id list",
                                                 "string", "float", "nested"]))
    mask = image_value(places, (4, 4), (0, 1, 2, 3, 9))
    ints = st.integers(-3, 70_000) | st.sampled_from([0, 1, 2, 3])
    if kind == "mask":
        return IMAGE_STRUCT, [draw(mask) for _ in range(rows)]
    if kind == "masks":
        return datasets.List(IMAGE_STRUCT), [draw(st.lists(mask, max_size=3)) for _ in range(rows)]
    if kind in ("classes", "class list"):
        names = draw(st.lists(st.sampled_from(["car", "road", "beach", "", "x y", "car"]), min_size=1, max_size=4))
        label = datasets.ClassLabel(names=list(dict.fromkeys(names)))
        value = st.integers(-1, label.num_classes - 1)
        if kind == "classes":
            return label, [draw(value) for _ in range(rows)]
        return datasets.List(label), [draw(st.lists(value, max_size=3)) for _ in range(rows)]
    if kind == "ids":
        return datasets.Value("int64"), [draw(ints) for _ in range(rows)]
    if kind == "id list":
        return datasets.List(datasets.Value("int64")), [draw(st.lists(ints | st.none(), max_size=4))
                                                        for _ in range(rows)]
    if kind == "string":
        return datasets.Value("string"), [draw(hostile_value) for _ in range(rows)]
    if kind == "float":
        return datasets.Value("float32"), [draw(st.floats(allow_nan=True, width=32)) for _ in range(rows)]
    return datasets.List(datasets.List(datasets.Value("int64"))), [[[1, 2], []] for _ in range(rows)]


@st.composite
def hostile_hf(draw: st.DrawFn, places: dict[str, str]) -> tuple[datasets.Features, dict[str, list[Any]]]:
    rows = draw(st.sampled_from([0, 1, 2, 2, 3, 3]))
    features: dict[str, Any] = {}
    columns: dict[str, list[Any]] = {}
    image = draw(st.sampled_from(["image"] * 4 + ["pixels", "absent", "string"]))
    if image == "string":
        features["image"], columns["image"] = datasets.Value("string"), ["x.png"] * rows
    elif image != "absent":
        features[image] = IMAGE_STRUCT
        columns[image] = [draw(image_value(places, (8, 8), ())) for _ in range(rows)]
    for i in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        features[f"label{i}"], columns[f"label{i}"] = label_column(draw, places, rows)
    return datasets.Features(features), columns


@fuzz(200)
@given(data=st.data())
def test_hf_rows_read_or_refuse(tmp_path_factory: pytest.TempPathFactory, places: dict[str, str],
                                data: st.DataObject) -> None:
    features, columns = data.draw(hostile_hf(places), label="columns")
    try:
        dataset = datasets.Dataset.from_dict(columns, features=features)
    except (ValueError, TypeError, OverflowError):
        assume(False)  # datasets itself refuses to write these: they cannot reach a reader
    folder = tmp_path_factory.mktemp("hf") / "set"
    dataset.save_to_disk(str(folder))
    info = json.loads((folder / "dataset_info.json").read_text())
    for name, feature in features.items():  # the image structs are Image columns
        if feature == IMAGE_STRUCT:
            info["features"][name] = IMAGE
        elif getattr(feature, "feature", None) == IMAGE_STRUCT:
            info["features"][name] = {"feature": IMAGE, "_type": "List"}
    concepts = data.draw(st.sampled_from(["valid", "valid", "valid", "mutated", "none"]), label="concepts")
    if concepts != "none":
        text = "\n".join(",".join(r) for r in CONCEPTS) + "\n"
        (folder / "concepts.csv").write_bytes(data.draw(mutated_table(CONCEPTS)) if concepts == "mutated"
                                              else text.encode())
    if data.draw(st.sampled_from([False, False, False, True]), label="features lie"):
        name = data.draw(st.sampled_from(sorted(info["features"]) or ["image"]), label="lying column")
        info["features"][name] = data.draw(st.sampled_from([
            IMAGE, {"_type": "ClassLabel", "names": ["car"]}, {"_type": "Value", "dtype": "int64"},
            {"_type": "Value", "dtype": "string"}, {"feature": IMAGE, "_type": "List"}]))
    (folder / "dataset_info.json").write_text(json.dumps(info))
    options = {} if data.draw(st.sampled_from([True, True, False])) else data.draw(st.fixed_dictionaries({}, optional={
        "mask_columns": st.lists(st.sampled_from([*columns, "nowhere", "label0:object", "label1:part"]),
                                 min_size=1, max_size=2),
        "image_column": st.sampled_from([*columns, "nowhere"])}), label="options")
    read_or_refuse(lambda: load_everything(HFDataset(f"hf:{folder}", **options)))


def test_class_values_past_the_class_names_are_refused(tmp_path: Path) -> None:
    """dataset_info.json names one class; the Arrow data holds the class 5 (found by fuzzing)."""
    features = datasets.Features({"image": datasets.Image(), "scene": datasets.Value("int64")})
    rows = {"image": [{"bytes": _png(np.zeros((8, 8, 3), dtype=np.uint8)), "path": None}], "scene": [5]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "set"))
    info = json.loads((tmp_path / "set" / "dataset_info.json").read_text())
    info["features"]["scene"] = {"_type": "ClassLabel", "names": ["beach"]}
    (tmp_path / "set" / "dataset_info.json").write_text(json.dumps(info))
    outcome = read_or_refuse(lambda: load_everything(HFDataset(f"hf:{tmp_path / 'set'}")))
    assert isinstance(outcome, DissectionError)


def test_an_image_path_to_a_fifo_is_refused_not_waited_on(tmp_path: Path, places: dict[str, str]) -> None:
    features = datasets.Features({"image": IMAGE_STRUCT, "scene": datasets.ClassLabel(names=["beach"])})
    rows = {"image": [{"bytes": None, "path": places["fifo"]}], "scene": [0]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "set"))
    info = json.loads((tmp_path / "set" / "dataset_info.json").read_text())
    info["features"]["image"] = IMAGE
    (tmp_path / "set" / "dataset_info.json").write_text(json.dumps(info))
    outcome = read_or_refuse(lambda: load_everything(HFDataset(f"hf:{tmp_path / 'set'}")), seconds=20)
    assert isinstance(outcome, DissectionError) and "is a FIFO" in str(outcome) and "fifo.png" in str(outcome)
