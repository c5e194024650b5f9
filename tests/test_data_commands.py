"""``dissect data validate / info / convert`` through the CLI, and plugin modules that stay light to import."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netdissection.plugins.datasets.generated import generate_concept_set

from .concept_folders import LABEL_SIZE, make_folder, write_csv, write_png


@pytest.fixture
def mine(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "mine")


def _problem_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def test_validate_a_clean_folder(run_cli, mine: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("data", "validate", mine)
    assert code == 0, out + err
    assert "OK" in out and "3 images (8×8), 4 label maps (4×4), 6 concepts" in out.replace("\n", " ")


def test_validate_finds_every_planted_defect(run_cli, mine: Path) -> None:  # type: ignore[no-untyped-def]
    with (mine / "concepts.csv").open("a", newline="") as f:
        csv.writer(f).writerows([[1, "cloud", "object"], [7, "metal", "material"]])
    (mine / "images/1.png").unlink()
    (mine / "masks/0_objects.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_png(mine / "masks/1.png", np.array([[2, 77, 300, 0]] * 4), "I;16")
    write_png(mine / "masks/0_colours.png", np.zeros((5, 4)), "I;16")
    Image.new("RGB", (10, 10)).save(mine / "images/3.png")
    Image.new("LA", LABEL_SIZE[::-1]).save(mine / "masks/3b.png")
    write_csv(mine / "samples.csv", [
        ["image", "masks", "labels"],
        ["images/0.png", "masks/0_objects.png;masks/0_parts.png;masks/0_colours.png", "beach"],
        ["images/1.png", "masks/1.png", "5;6"],
        ["images/2.png", "", "stripd"],
        ["images/3.png", "masks/3.png;masks/3b.png", "striped"],
    ])
    code, out, err = run_cli("data", "validate", mine)
    assert code == 2
    expected = [
        "concepts.csv line 8: id 1 is already used on line 2",
        "images/1.png: is missing (samples.csv line 3)",
        "masks/0_objects.png: is corrupt: not a readable image file (samples.csv line 2)",
        "masks/1.png: holds ids that are not in concepts.csv: 77 (samples.csv line 3)",
        "masks/0_colours.png: is 5×4 (h×w) but masks/0_parts.png is 4×4",
        "samples.csv line 4: unknown image-level label 'stripd'; did you mean 'striped'?",
        "images/3.png: is 10×10 (h×w) but images/0.png is 8×8",
        "masks/3.png: is missing (samples.csv line 5)",
        "masks/3b.png: cannot be read as a label map: its mode is LA",
        "concepts.csv: the category 'material' is empty",
    ]
    lines = _problem_lines(out)
    for needle in expected:
        assert sum(str(mine / needle.split(":")[0].split(" line")[0]) in line and needle.split(": ", 1)[1] in line
                   for line in lines) == 1, (needle, out)
    assert len(lines) == len(expected), out
    assert err.strip().startswith("error:") and f"{len(expected)} problem(s)" in err
    assert len(err.strip().splitlines()) == 1


def test_validate_reports_a_broken_header_and_a_missing_file(run_cli, mine: Path) -> None:  # type: ignore[no-untyped-def]
    (mine / "concepts.csv").unlink()
    text = (mine / "samples.csv").read_text().replace("image,masks,labels", "image,mask,labels")
    (mine / "samples.csv").write_text(text)
    code, out, _ = run_cli("data", "validate", mine)
    assert code == 2
    assert "concepts.csv: is missing" in out
    assert "samples.csv: unknown column 'mask'; did you mean 'masks'?" in out


def test_validate_any_other_format_by_loading_it(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broden = generate_concept_set(tmp_path / "b", images=6, image_size=32, seed=0)
    code, out, _ = run_cli("data", "validate", broden)
    assert code == 0 and "6 images, 31 concepts" in out
    (broden / "images/gen/000001_color.png").write_bytes(b"junk")
    code, out, err = run_cli("data", "validate", broden)
    assert code == 2 and "000001_color.png is corrupt" in out and "1 problem(s)" in err


def test_info_shows_coverage_per_category(run_cli, mine: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("data", "info", mine, "--workers", "0")
    assert code == 0, err
    assert "folder format, 3 images, 6 concepts in 5 categories" in out.replace("\n", " ")
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    # object: image 0 has 12 of 16 pixels, image 1 has 4 → 16 of 48 label pixels.
    assert rows["object"] == ["pixel", "2", "2", "2", "33.3%"]
    assert rows["scene"] == ["image", "1", "1", "2", "66.7%"]
    assert rows["part"] == ["pixel", "1", "1", "1", "2.1%"]


def test_convert_errors(run_cli, mine: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("data", "convert", mine, tmp_path / "x", "--format", "brodn")
    assert code == 2 and "'brodn'; did you mean 'broden'" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    code, _, err = run_cli("data", "convert", mine, tmp_path / "taken")
    assert code == 2 and "already exists and is not empty" in err
    code, _, err = run_cli("data", "convert", tmp_path / "nowhere", tmp_path / "y")
    assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "taken"]  # nothing half-written


def test_convert_selected_categories_to_broden(run_cli, mine: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from netdissection.plugins.datasets.broden import BrodenDataset

    code, _, err = run_cli("data", "convert", mine, tmp_path / "b", "--categories", "object,scene")
    assert code == 0, err
    ds = BrodenDataset(tmp_path / "b")
    assert ds.vocabulary.categories == ("object", "scene")
    assert [c.name for c in ds.vocabulary.concepts] == ["sky", "car", "beach"]
    sample = ds.load(0)
    assert sample.image_labels == (5,) and set(np.unique(sample.layers)) == {0, 1, 2}


def test_plugin_modules_import_no_heavy_package() -> None:
    code = ("import sys\n"
            "import netdissection.plugins.datasets.folder_dataset as f, "
            "netdissection.plugins.datasets.hf_dataset as h, "
            "netdissection.plugins.datasets.data_commands, netdissection.plugins.datasets.download\n"
            "f.dissect_register_datasets(lambda *a, **k: None); h.dissect_register_datasets(lambda *a, **k: None)\n"
            "print(sorted(m for m in ('torch', 'datasets', 'pyarrow', 'torchvision') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
