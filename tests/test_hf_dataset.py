"""The HuggingFace adapter on saved datasets made here (offline): columns, concept names, splits, errors,
pickling for worker processes, and a run through the CLI with --concepts."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from netdissection.core import loading
from netdissection.core.errors import DissectionError, UnknownNameError
from netdissection.plugins.datasets.hf_dataset import HFDataset, is_hf

SIZE = 32


def _png(array: np.ndarray) -> dict[str, object]:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}


def _seg(i: int) -> np.ndarray:
    seg = np.zeros((SIZE // 2, SIZE // 2), dtype=np.uint16)
    seg[: 4 + i] = 1  # car
    seg[10:, 2 * i:] = 2  # road
    return seg


def _rows(count: int, seed: int) -> dict[str, list[object]]:
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(count):
        wheel = np.zeros((SIZE // 2, SIZE // 2), dtype=np.uint16)
        wheel[3, : i + 1] = 10
        parts.append([_png(wheel), _png(np.where(wheel > 0, 0, 11).astype(np.uint16))] if i % 2 == 0 else [])
    return {
        "pixels": [_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(count)],
        "seg": [_png(_seg(i)) for i in range(count)],
        "parts": parts,
        "scene": [i % 2 if i < count - 1 else -1 for i in range(count)],
        "row_id": list(range(100, 100 + count)),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict with train (4 rows) and validation (3 rows), saved to disk, plus concept files."""
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({
        "pixels": datasets.Image(), "seg": datasets.Image(), "parts": datasets.List(datasets.Image()),
        "scene": datasets.ClassLabel(names=["beach", "street"]), "row_id": datasets.Value("int64")})
    splits = {name: datasets.Dataset.from_dict(_rows(n, seed), features=features)
              for name, n, seed in (("train", 4, 0), ("validation", 3, 1))}
    datasets.DatasetDict(splits).save_to_disk(str(root / "set"))
    (root / "id2label.json").write_text(json.dumps({"0": "unlabeled", "1": "car", "2": "road"}))
    (root / "concepts.csv").write_text("id,name,category\n1,car,object\n2,road,object\n10,wheel,part\n"
                                       "11,body,part\n")
    return root


def test_columns_classlabels_and_an_id2label_file(saved: Path) -> None:
    ds = HFDataset(f"hf:{saved / 'set'}", image_column="pixels", mask_columns=["seg:object", "scene"],
                   split="validation", concepts=saved / "id2label.json")
    assert ds.vocabulary.categories == ("object", "scene")
    assert [(c.number, c.name, c.category) for c in ds.vocabulary.concepts] == [
        (1, "car", "object"), (2, "road", "object"), (3, "beach", "scene"), (4, "street", "scene")]
    assert len(ds) == 3
    first = ds.load(1)
    assert first.image.shape == (SIZE, SIZE, 3) and first.label_shape == (SIZE // 2, SIZE // 2)
    np.testing.assert_array_equal(first.layers, _seg(1)[None])
    assert first.image_labels == (4,)  # ClassLabel 1 = street
    assert ds.load(2, image=False).image_labels == ()  # ClassLabel -1: no label
    expected = datasets.load_from_disk(str(saved / "set"))["validation"][1]["pixels"]
    np.testing.assert_array_equal(first.image, np.asarray(expected.convert("RGB")))


def test_every_label_column_found_with_a_concepts_csv(saved: Path) -> None:
    ds = HFDataset(saved / "set", split="train", image_column="pixels", concepts=saved / "concepts.csv")
    assert [c.name for c in ds.columns] == ["seg", "parts", "scene"]  # the scalar row_id is left alone
    assert ds.vocabulary.categories == ("object", "part", "scene")
    sample = ds.load(0)
    assert sample.layers.shape == (3, SIZE // 2, SIZE // 2)  # seg + the two part layers
    assert set(np.unique(sample.layers[1:])) == {0, 10, 11}
    assert ds.load(1).layers.shape[0] == 1  # no parts in row 1
    only_parts = HFDataset(saved / "set", categories=["part"], split="train", image_column="pixels",
                           concepts=saved / "concepts.csv")
    assert not only_parts.load(0).layers[0].any() and only_parts.load(0).image_labels == ()


def test_detected_with_or_without_the_prefix(saved: Path) -> None:
    assert is_hf("hf:some/hub-name") and is_hf(saved / "set") and not is_hf(saved)


def test_pickles_small_and_reopens_in_a_worker(saved: Path) -> None:
    ds = HFDataset(f"hf:{saved / 'set'}", image_column="pixels", mask_columns=["seg:object", "scene"],
                   split="train", concepts=saved / "id2label.json")
    ds.load(0)
    state = pickle.dumps(ds)
    assert len(state) < 10_000
    assert pickle.loads(state)._ds is None
    batches = list(loading.iterate(ds, batch_size=3, workers=1, image=True, labels=True, skip_bad=False))
    assert sum(len(b.indices) for b in batches) == 4
    for i in range(4):
        batch, row = batches[i // 3], i % 3
        np.testing.assert_array_equal(batch.images[row].numpy(), ds.load(i).image)
        np.testing.assert_array_equal(batch.layers[row, 0].numpy(), ds.load(i).layers[0])


@pytest.mark.parametrize(("options", "message"), [
    ({"image_column": "pixel", "split": "train"}, r"unknown column of .* 'pixel'; did you mean 'pixels'"),
    ({"image_column": "pixels", "split": "test"}, r"unknown split .* 'test'"),
    ({"image_column": "pixels"}, r"has the splits train, validation; pick one with --split"),
    ({"image_column": "pixels", "split": "train", "mask_columns": ["seg"]}, r"column seg .* pass --concepts FILE"),
    ({"image_column": "pixels", "split": "train", "mask_columns": ["seg:object", "parts:part"],
      "concepts": "id2label.json"}, r"gives no categories and the label columns name 2 categories"),
    ({"image_column": "scene", "split": "train"}, r"--image-column scene: the column is ClassLabel"),
    ({"image_column": "pixels", "split": "train", "mask_columns": ["seg"], "concepts": "nowhere.csv"},
     r"concepts file .*nowhere\.csv does not exist"),
])
def test_mistakes_are_one_clear_error(saved: Path, options: dict[str, object], message: str) -> None:
    if "concepts" in options:
        options = {**options, "concepts": saved / str(options["concepts"])}
    with pytest.raises(DissectionError, match=message):
        HFDataset(f"hf:{saved / 'set'}", **options)  # type: ignore[arg-type]


def test_unknown_names_suggest_close_ones(saved: Path) -> None:
    with pytest.raises(UnknownNameError, match="'sge'; did you mean 'seg'"):
        HFDataset(saved / "set", image_column="pixels", split="train", mask_columns=["sge"])


def test_unopenable_reference(tmp_path: Path) -> None:
    with pytest.raises(DissectionError, match="cannot open the HuggingFace dataset"):
        HFDataset(f"hf:{tmp_path / 'nowhere'}")


def test_an_id_the_concepts_file_does_not_name(saved: Path, tmp_path: Path) -> None:
    (tmp_path / "few.json").write_text(json.dumps({"1": "car"}))
    ds = HFDataset(saved / "set", image_column="pixels", split="train", mask_columns=["seg:object"],
                   concepts=tmp_path / "few.json")
    with pytest.raises(DissectionError, match=r"row 0 of .* \(column seg\) holds ids \[2\]"):
        ds.load(0)


def test_dissect_run_through_the_cli(run_cli, saved: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code, _, err = run_cli("resnet18", "--dataset", f"hf:{saved / 'set'}", "--image-column", "pixels",
                           "--mask-column", "seg:object", "--mask-column", "scene", "--split", "train",
                           "--concepts", saved / "id2label.json", "--layer", "layer1", "--workers", "0",
                           "--out", out, "--report", "tally")
    assert code == 0, err
    header = (out / "layer1" / "tally.csv").read_text().splitlines()[0]
    assert header.endswith("object-iou,scene-label,scene-truth,scene-activation,scene-intersect,scene-iou")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["dataset"]["format"] == "hf" and summary["images"] == 4
    # The reports rebuilt from the saved results reopen the same split and columns for the image strips.
    code, _, err = run_cli("report", out, "--report", "html")
    assert code == 0, err
    assert "without image strips" not in err
    assert len(list((out / "report_files").rglob("unit*.jpg"))) == 64
