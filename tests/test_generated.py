"""Tests of the procedural Broden-format concept set (netdissection.plugins.datasets.generated)."""

from __future__ import annotations

import csv
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from netdissection.plugins.datasets import generated
from netdissection.plugins.datasets.generated import CATEGORIES, LABELS, PALETTE, generate_concept_set

PIXEL = ("object", "color", "material", "part")
IMAGE = ("scene", "texture")


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def header(path: pathlib.Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


def decode(path: pathlib.Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path)).astype(np.int64)
    assert rgb.ndim == 3 and rgb.shape[2] == 3, "label PNGs are RGB"
    assert not rgb[..., 2].any(), "blue channel must be 0"
    return rgb[..., 0] + 256 * rgb[..., 1]


def layers(root: pathlib.Path, cell: str) -> list[np.ndarray]:
    return [decode(root / "images" / name) for name in cell.split(";")] if cell else []


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return generate_concept_set(tmp_path_factory.mktemp("gen") / "small", images=12, image_size=32, seed=3)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return generate_concept_set(tmp_path_factory.mktemp("gen") / "medium", images=40, image_size=64, seed=0)


def test_layout_and_headers(small: pathlib.Path) -> None:
    for name in ("index.csv", "label.csv", "category.csv", "README.txt"):
        assert (small / name).is_file()
    assert header(small / "index.csv") == ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES]
    assert header(small / "label.csv") == ["number", "name", "category", "frequency", "coverage", "syns"]
    assert header(small / "category.csv") == ["name", "first", "last", "count", "frequency"]
    for cat in CATEGORIES:
        assert header(small / f"c_{cat}.csv") == ["code", "number", "name", "frequency", "coverage"]
    assert (small / "label.csv").read_text().splitlines()[1] == "0,-,-,0,0.0,"
    assert [r["name"] for r in read_csv(small / "category.csv")] == list(CATEGORIES)

    rows = read_csv(small / "index.csv")
    assert len(rows) == 12
    for row in rows:
        assert row["split"] == "train"
        assert (int(row["ih"]), int(row["iw"]), int(row["sh"]), int(row["sw"])) == (32, 32, 16, 16)
        with Image.open(small / "images" / row["image"]) as im:
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
        for cat in PIXEL:
            for layer in layers(small, row[cat]):
                assert layer.shape == (16, 16)


def test_label_tables_are_consistent(small: pathlib.Path) -> None:
    labels = read_csv(small / "label.csv")[1:]
    assert [int(r["number"]) for r in labels] == list(range(1, len(LABELS) + 1))
    names = [r["name"] for r in labels]
    assert len(set(names)) == len(names)
    assert all(n.endswith("-c") for n in generated._NAMES["color"])
    assert all(n.endswith("-s") for n in generated._NAMES["scene"])
    for cat_row in read_csv(small / "category.csv"):
        codes = read_csv(small / f"c_{cat_row['name']}.csv")
        assert [int(r["code"]) for r in codes] == list(range(1, len(codes) + 1))
        assert (int(cat_row["first"]), int(cat_row["last"]), int(cat_row["count"])) == (
            1,
            len(codes),
            len(codes),
        )
        for r in codes:
            assert labels[int(r["number"]) - 1]["name"] == r["name"]
            assert f"{cat_row['name']}(" in labels[int(r["number"]) - 1]["category"]
    wheel = next(r for r in labels if r["name"] == "wheel")
    assert wheel["category"].startswith("object(") and ";part(" in wheel["category"]


def test_every_category_present_in_twelve_images(small: pathlib.Path) -> None:
    rows = read_csv(small / "index.csv")
    for cat in CATEGORIES:
        assert any(row[cat] for row in rows), cat
    frequency = {r["name"]: int(r["frequency"]) for r in read_csv(small / "category.csv")}
    assert all(frequency[cat] > 0 for cat in CATEGORIES)
    # Images that miss categories exist, including one without color.
    assert any(not row["color"] for row in rows)
    assert any(not row["scene"] for row in rows)
    # Every label occurs somewhere (the first nine images cycle through all variants).
    assert all(int(r["frequency"]) > 0 for r in read_csv(small / "label.csv")[1:])


def test_label_ids_belong_to_their_column(small: pathlib.Path) -> None:
    known = {int(r["number"]) for r in read_csv(small / "label.csv")}
    for row in read_csv(small / "index.csv"):
        for cat in CATEGORIES:
            members = {int(r["number"]) for r in read_csv(small / f"c_{cat}.csv")}
            if cat in PIXEL:
                for layer in layers(small, row[cat]):
                    ids = set(np.unique(layer).tolist()) - {0}
                    assert ids, f"{row['image']} {cat}: an annotated layer with no labels"
                    assert ids <= known and ids <= members, (row["image"], cat, ids - members)
            elif row[cat]:
                assert {int(n) for n in row[cat].split(";")} <= members


def test_multilayer_parts(medium: pathlib.Path) -> None:
    wheel, hub = generated._NUM["wheel"], generated._NUM["hub"]
    cells = [row["part"] for row in read_csv(medium / "index.csv") if row["part"]]
    assert any(len(cell.split(";")) == 2 for cell in cells)
    hubs = 0
    for cell in cells:
        stack = layers(medium, cell)
        for deeper in stack[1:]:
            is_hub = deeper == hub
            hubs += int(is_hub.sum())
            assert np.all(stack[0][is_hub] == wheel), "hub pixels must be wheel in layer 1"
    assert hubs > 0


def recount(root: pathlib.Path) -> tuple[dict[str, dict[int, list[float]]], dict[int, list[float]]]:
    """(per category, overall) label -> [frequency, coverage] recomputed from the index and the PNGs."""
    per_cat: dict[str, dict[int, list[float]]] = {cat: {} for cat in CATEGORIES}
    overall: dict[int, list[float]] = {}
    for row in read_csv(root / "index.csv"):
        area = int(row["sh"]) * int(row["sw"])
        seen: dict[int, float] = {}
        all_layers = []
        for cat in CATEGORIES:
            if cat in PIXEL:
                stack = layers(root, row[cat])
                all_layers += stack
                fractions = (
                    {
                        int(n): float(np.any([s == n for s in stack], axis=0).sum()) / area
                        for n in np.unique(stack)
                        if n
                    }
                    if stack
                    else {}
                )
            else:
                fractions = {int(n): 1.0 for n in row[cat].split(";")} if row[cat] else {}
                seen.update(fractions)
            for n, fraction in fractions.items():
                entry = per_cat[cat].setdefault(n, [0, 0.0])
                entry[0] += 1
                entry[1] += fraction
        if all_layers:
            for n in np.unique(all_layers):
                if n:
                    seen[int(n)] = float(np.any([s == n for s in all_layers], axis=0).sum()) / area
        for n, fraction in seen.items():
            entry = overall.setdefault(n, [0, 0.0])
            entry[0] += 1
            entry[1] += fraction
    return per_cat, overall


@pytest.mark.parametrize("fixture", ["small", "medium"])
def test_coverage_matches_recount(fixture: str, request: pytest.FixtureRequest) -> None:
    root: pathlib.Path = request.getfixturevalue(fixture)
    per_cat, overall = recount(root)
    for cat in CATEGORIES:
        for r in read_csv(root / f"c_{cat}.csv"):
            freq, cov = per_cat[cat].get(int(r["number"]), [0, 0.0])
            assert int(r["frequency"]) == freq, (cat, r["name"])
            assert float(r["coverage"]) == pytest.approx(cov, abs=1e-5), (cat, r["name"])
    for r in read_csv(root / "label.csv")[1:]:
        freq, cov = overall.get(int(r["number"]), [0, 0.0])
        assert int(r["frequency"]) == freq, r["name"]
        assert float(r["coverage"]) == pytest.approx(cov, abs=1e-5), r["name"]
        for part in r["category"].split(";"):
            cat, count = part.rstrip(")").split("(")
            assert int(count) == per_cat[cat].get(int(r["number"]), [0])[0]
    rows = read_csv(root / "index.csv")
    for r in read_csv(root / "category.csv"):
        assert int(r["frequency"]) == sum(bool(row[r["name"]]) for row in rows)


@pytest.mark.parametrize("fixture", ["small", "medium"])
def test_wheel_is_primarily_a_part(fixture: str, request: pytest.FixtureRequest) -> None:
    root: pathlib.Path = request.getfixturevalue(fixture)

    def coverage(cat: str) -> float:
        return next(float(r["coverage"]) for r in read_csv(root / f"c_{cat}.csv") if r["name"] == "wheel")

    assert coverage("part") > coverage("object") > 0


def test_colour_labels_align_with_pixels(medium: pathlib.Path) -> None:
    """On texture images (no material shading), a label pixel's 2×2 image block is near its palette colour."""
    palette = {generated._NUM[name]: np.array(rgb) for name, rgb in PALETTE.items()}
    checked = 0
    for row in read_csv(medium / "index.csv"):
        if not row["texture"]:
            continue
        (color,) = layers(medium, row["color"])
        image = np.asarray(Image.open(medium / "images" / row["image"])).astype(float)
        h, w = color.shape
        blocks = image[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        expected = np.stack([palette[int(n)] for n in color.ravel()]).reshape(h, w, 3)
        error = np.abs(blocks - expected).max(axis=2)
        assert np.median(error) < 20
        checked += 1
    assert checked


def test_deterministic(tmp_path: pathlib.Path) -> None:
    a = generate_concept_set(tmp_path / "a", images=12, image_size=32, seed=5)
    b = generate_concept_set(tmp_path / "b", images=12, image_size=32, seed=5)
    c = generate_concept_set(tmp_path / "c", images=12, image_size=32, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert any((a / rel).read_bytes() != (c / rel).read_bytes() for rel in files if (c / rel).exists())


def test_odd_and_tiny_sizes(tmp_path: pathlib.Path) -> None:
    root = generate_concept_set(tmp_path / "odd", images=3, image_size=33, seed=1)
    row = read_csv(root / "index.csv")[0]
    assert (row["ih"], row["sh"]) == ("33", "16")
    assert layers(root, row["object"])[0].shape == (16, 16)
    tiny = generate_concept_set(tmp_path / "tiny", images=1, image_size=2)
    assert read_csv(tiny / "index.csv")[0]["sh"] == "1"


def test_atomic_and_refuses_existing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_concept_set(tmp_path / "set", images=3, image_size=16)
    with pytest.raises(FileExistsError):
        generate_concept_set(root, images=3, image_size=16)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_concept_set(tmp_path / "other", images=3, image_size=16)
    (tmp_path / "empty").mkdir()
    assert (generate_concept_set(tmp_path / "empty", images=3, image_size=16) / "index.csv").exists()

    def boom(folder: pathlib.Path, *args: object) -> None:
        (folder / "partial.txt").write_text("half done")
        raise KeyboardInterrupt

    monkeypatch.setattr(generated, "_write_set", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_concept_set(tmp_path / "killed", images=3, image_size=16)
    assert not (tmp_path / "killed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other", "set"], "no tmp folder left"


def test_default_concept_set(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The real default is 300 images of 224 px; shrink it to keep the test fast.
    monkeypatch.setattr(generated, "DEFAULT_IMAGES", 4)
    monkeypatch.setattr(generated, "DEFAULT_SIZE", 16)
    monkeypatch.setenv("NETDISSECTION_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger=generated.__name__):
        root = generated.default_concept_set()
        again = generated.default_concept_set()
    assert root == again == tmp_path / "cache" / "builtin-concepts-v1-16-4-s0"
    assert (root / "index.csv").exists()
    assert len([r for r in caplog.records if r.name == generated.__name__]) == 1

    monkeypatch.delenv("NETDISSECTION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert generated.default_concept_set().parent == tmp_path / "xdg" / "netdissection"
    assert generated.default_concept_set(tmp_path / "given").parent == tmp_path / "given"


def test_lost_race_uses_winner(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator whose rename loses to a concurrent one uses the winner's folder and cleans up."""
    monkeypatch.setattr(generated, "DEFAULT_IMAGES", 2)
    monkeypatch.setattr(generated, "DEFAULT_SIZE", 16)
    real_write = generated._write_set
    root = tmp_path / "builtin-concepts-v1-16-2-s0"

    def write_then_lose(folder: pathlib.Path, *args: int) -> None:
        real_write(folder, *args)
        monkeypatch.setattr(generated, "_write_set", real_write)
        generate_concept_set(root, images=2, image_size=16)  # the other generator finishes first

    monkeypatch.setattr(generated, "_write_set", write_then_lose)
    assert generated.default_concept_set(tmp_path) == root
    assert (root / "index.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == [root.name], "the loser's tmp folder is removed"
