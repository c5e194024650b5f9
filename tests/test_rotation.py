"""Basis rotation (--rotate): Q is a Haar rotation and Q^α its exact real fractional power; α = 0 is the
plain run byte for byte; a planted-detector model loses its detectors as α grows while the same rotation,
undone in the next linear layer, leaves the model's function unchanged; keys, provenance, compare, bad input."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netdissection
from netdissection.core import rotation as rot
from netdissection.core.scores import count_detectors, unit_scores
from netdissection.plugins.datasets.generated import PALETTE, generate_concept_set

from .cli_checks import assert_one_line_error

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ---- Q and Q^α -------------------------------------------------------------------------------------------------

def orthogonality_error(m: np.ndarray) -> float:
    return float(np.abs(m.T @ m - np.eye(len(m))).max())


@pytest.mark.parametrize("units", [2, 3, 16, 97])
def test_q_and_its_powers_are_rotations(units: int) -> None:
    q = rot.haar_rotation(units, np.random.default_rng(7))
    assert orthogonality_error(q) < 1e-6 and np.linalg.det(q) == pytest.approx(1.0)
    planes = rot.rotation_planes(q)
    for alpha in (0.0, 0.3, 0.7, 1.0):
        power = rot.fractional_rotation(q, alpha, planes)
        assert power.dtype == np.float64 and np.isrealobj(power)
        assert orthogonality_error(power) < 1e-6
        assert np.linalg.det(power) == pytest.approx(1.0)
    assert np.array_equal(rot.fractional_rotation(q, 0.0), np.eye(units))  # exactly the identity
    assert np.array_equal(rot.fractional_rotation(q, 1.0), q)  # exactly Q
    # Powers compose, and agree with scipy's (complex Schur + Padé) fractional power where it is real.
    from scipy.linalg import fractional_matrix_power

    half = rot.fractional_rotation(q, 0.5, planes)
    np.testing.assert_allclose(half @ half, q, atol=1e-12)
    np.testing.assert_allclose(rot.fractional_rotation(q, 0.3, planes) @ rot.fractional_rotation(q, 0.4, planes),
                               rot.fractional_rotation(q, 0.7, planes), atol=1e-12)
    reference = fractional_matrix_power(q, 0.3)
    np.testing.assert_allclose(rot.fractional_rotation(q, 0.3, planes), np.real(reference), atol=1e-9)


def test_eigenvalue_minus_one_pairs_make_a_plane() -> None:
    """A rotation by π in some planes (eigenvalues −1, −1): its powers stay real and orthogonal."""
    basis = rot.haar_rotation(6, np.random.default_rng(3))
    q = basis @ np.diag([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0]) @ basis.T
    half = rot.fractional_rotation(q, 0.5)
    assert np.isrealobj(half) and orthogonality_error(half) < 1e-12
    np.testing.assert_allclose(half @ half, q, atol=1e-12)
    with pytest.raises(ValueError, match="determinant"):
        rot.rotation_planes(np.diag([-1.0, 1.0, 1.0]))


def test_q_is_haar_distributed() -> None:
    """On SO(3) the rotation angle of a Haar rotation has density (1 − cos θ)/π; a bare QR factor (without
    the sign fix) is not Haar and fails this test."""
    from scipy.stats import kstest

    rng = np.random.default_rng(0)
    angles = [np.arccos(np.clip((np.trace(rot.haar_rotation(3, rng)) - 1) / 2, -1, 1)) for _ in range(2000)]
    assert kstest(angles, lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3
    bare = []
    for _ in range(2000):
        q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
        q = q if np.linalg.det(q) > 0 else -q
        bare.append(np.arccos(np.clip((np.trace(q) - 1) / 2, -1, 1)))
    assert kstest(bare, lambda t: (t - np.sin(t)) / np.pi).pvalue < 1e-6


def test_seed_and_layer_pick_q() -> None:
    first = rot.layer_matrix(rot.Rotation(1.0, seed=0), "layer4", 32)
    assert np.array_equal(first, rot.layer_matrix(rot.Rotation(1.0, seed=0), "layer4", 32))  # same seed, same Q
    assert not np.allclose(first, rot.layer_matrix(rot.Rotation(1.0, seed=1), "layer4", 32))  # another seed
    assert not np.allclose(first, rot.layer_matrix(rot.Rotation(1.0, seed=0), "layer3", 32))  # another layer
    # Every α of a layer is a power of the same Q.
    half = rot.layer_matrix(rot.Rotation(0.5, seed=0), "layer4", 32)
    np.testing.assert_allclose(half @ half, first, atol=1e-12)


def test_transform_applies_the_matrix() -> None:
    matrix = rot.layer_matrix(rot.Rotation(0.6, seed=2), "x", 24)
    transform = rot.RotationTransform("x", matrix)
    maps = torch.randn(5, 24, 3, 4)
    expected = np.einsum("ij,njhw->nihw", matrix, maps.double().numpy())
    np.testing.assert_allclose(transform(maps).double().numpy(), expected, atol=1e-5)
    again = pickle.loads(pickle.dumps(transform))  # plans travel to worker processes
    assert torch.equal(again(maps), transform(maps))
    identity = rot.RotationTransform("x", np.eye(24))
    assert identity(maps) is maps
    with pytest.raises(netdissection.DissectionError, match="gives 23 units"):
        transform(torch.randn(1, 23, 2, 2))


# ---- a planted-detector model ------------------------------------------------------------------------------------

class PlantedColours(nn.Module):
    """A unit per colour of the generated set's palette (a Gaussian bump around the colour) and a texture unit
    (local contrast pooled widely), at half resolution; then a linear read-out, as a classifier would have."""

    def __init__(self, outputs: int = 5) -> None:
        super().__init__()
        colours = torch.tensor([PALETTE[c] for c in PALETTE], dtype=torch.float32) / 255
        self.register_buffer("colours", colours)  # (K, 3): a rank-5 buffer would not go channels-last
        self.units = nn.Identity()  # the dissected layer
        self.head = nn.Conv2d(len(PALETTE) + 1, outputs, 1)
        torch.manual_seed(0)
        nn.init.normal_(self.head.weight)

    def features(self, normalised: torch.Tensor) -> torch.Tensor:
        half = F.avg_pool2d(normalised * STD + MEAN, 2)
        colour = torch.exp(-((half[:, None] - self.colours.view(1, -1, 3, 1, 1)) ** 2).sum(2) / (2 * 0.12**2))
        mean = F.avg_pool2d(half, 5, stride=1, padding=2, count_include_pad=False)
        square = F.avg_pool2d(half * half, 5, stride=1, padding=2, count_include_pad=False)
        contrast = (square - mean * mean).clamp(min=0).sum(1, keepdim=True).sqrt()
        texture = F.avg_pool2d(contrast, 15, stride=1, padding=7, count_include_pad=False)
        return self.units(torch.cat([colour, texture], dim=1))

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(normalised)).mean((2, 3))


class RotatedColours(nn.Module):
    """The same network with its units rotated by R and the rotation undone in the next linear layer
    (W → W Rᵀ = W R^{-1}): a rotated layer and the same function."""

    def __init__(self, planted: PlantedColours, matrix: np.ndarray) -> None:
        super().__init__()
        self.planted = planted
        r = torch.from_numpy(matrix).float()
        self.rotate = nn.Conv2d(len(r), len(r), 1, bias=False)
        self.rotate.weight.data = r[:, :, None, None]
        self.rotated = nn.Identity()  # the rotated layer
        self.head = nn.Conv2d(len(r), planted.head.out_channels, 1)
        self.head.weight.data = (planted.head.weight[:, :, 0, 0] @ r.T)[:, :, None, None]
        self.head.bias.data = planted.head.bias.data.clone()

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.head(self.rotated(self.rotate(self.planted.features(normalised)))).mean((2, 3))


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("rotation") / "set", images=60, image_size=64, seed=12)


def run(model: nn.Module, dataset: Path, layer: str = "units", **options: Any) -> netdissection.RunResult:
    return netdissection.dissect(model, dataset=str(dataset), layers=[layer], quantile=0.1, workers=0, **options)


def counts(result: netdissection.RunResult, layer: str = "units") -> Any:
    rows = unit_scores(result.layers[layer])
    return count_detectors(rows, result.layers[layer].vocabulary.categories)


@pytest.mark.slow
def test_alpha_zero_is_the_plain_run_byte_for_byte(planted_set: Path, tmp_path: Path) -> None:
    model = PlantedColours().eval()
    plain = run(model, planted_set, out=tmp_path / "plain", reporters=["tally"])
    result = run(model, planted_set, out=tmp_path / "zero", reporters=["tally"], rotate=0.0, rotate_seed=5)
    tally = "units/tally.csv"
    assert (tmp_path / "zero" / tally).read_bytes() == (tmp_path / "plain" / tally).read_bytes()
    for field in ("thresholds", "intersection", "truth", "activation"):
        assert np.array_equal(getattr(result.layers["units"], field), getattr(plain.layers["units"], field))
    recorded = json.loads((tmp_path / "zero" / "summary.json").read_text())["provenance"]["rotation"]
    assert (recorded["alpha"], recorded["seed"]) == (0.0, 5) and result.provenance["rotation"] == recorded
    assert recorded["layers"]["units"]["units"] == len(PALETTE) + 1
    assert "rotation" not in json.loads((tmp_path / "plain" / "summary.json").read_text())["provenance"]


@pytest.mark.slow
def test_the_transform_is_exact_on_a_permutation(planted_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the passes, a permutation matrix permutes the thresholds and counts exactly."""
    model = PlantedColours().eval()
    plain = run(model, planted_set).layers["units"]
    units = len(PALETTE) + 1
    order = np.random.default_rng(1).permutation(units)
    monkeypatch.setattr(rot, "layer_matrix", lambda rotation, layer, n: np.eye(n)[order])
    permuted = run(model, planted_set, rotate=0.5).layers["units"]
    assert np.array_equal(permuted.thresholds, plain.thresholds[order])
    assert np.array_equal(permuted.intersection, plain.intersection[order])
    assert np.array_equal(permuted.activation, plain.activation[order])


@pytest.mark.slow
def test_planted_detectors_fade_as_alpha_grows_while_the_function_stays(planted_set: Path) -> None:
    model = PlantedColours().eval()
    results = {alpha: run(model, planted_set, rotate=alpha, rotate_seed=0) for alpha in (0.0, 0.5, 1.0)}
    unique = [counts(results[a]).unique_labels for a in (0.0, 0.5, 1.0)]
    best = [np.mean([r.score for r in unit_scores(results[a].layers["units"])]) for a in (0.0, 0.5, 1.0)]
    assert unique[0] >= 10, unique  # at α = 0 the units are the colours (and texture) they were built for
    assert unique[0] > unique[1] > unique[2], unique  # interpretability falls with α ...
    assert best[0] > max(best[1:]), best  # the mean best IoU too

    # ... while the function does not: the rotation undone in the next linear layer gives the same outputs.
    matrix = rot.layer_matrix(rot.Rotation(0.5, seed=0), "units", len(PALETTE) + 1)
    rotated = RotatedColours(model, matrix).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(rotated(images), model(images), atol=1e-5, rtol=1e-5)
    # And the rotated layer of that network is what --rotate dissects.
    inside = run(rotated, planted_set, layer="rotated").layers["rotated"]
    transformed = results[0.5].layers["units"]
    np.testing.assert_allclose(inside.thresholds, transformed.thresholds, rtol=1e-5, atol=1e-6)
    assert [r.label for r in unit_scores(inside)] == [r.label for r in unit_scores(transformed)]
    np.testing.assert_allclose([r.score for r in unit_scores(inside)], [r.score for r in unit_scores(transformed)],
                               atol=2e-3)


# ---- job keys ---------------------------------------------------------------------------------------------------

def test_rotation_enters_the_job_key(tmp_path: Path) -> None:
    from netdissection.core.jobkey import Job, key_material, key_of
    from netdissection.registry import build_host

    host = build_host()
    dataset = generate_concept_set(tmp_path / "set", images=3, image_size=16, seed=0)
    rule = {"name": "quantile", "params": {"q": 0.005}}
    base = Job(model="resnet18", dataset=str(dataset))
    plain = key_material(base, host, rule)
    assert "rotation" not in plain  # the keys of jobs without a rotation are what they were
    keys = {key_of(plain)}
    for job in (replace(base, rotate=0.0), replace(base, rotate=0.5), replace(base, rotate=1.0),
                replace(base, rotate=0.5, rotate_seed=1)):
        material = key_material(job, host, rule)
        assert material["rotation"]["alpha"] == job.rotate and material["rotation"]["seed"] == job.rotate_seed
        keys.add(key_of(material))
    assert len(keys) == 5


# ---- the command line -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("rotation-cli") / "set", images=12, image_size=64, seed=0)


@pytest.mark.slow
def test_each_layer_has_its_own_q(run_cli: Any, small_set: Path, tmp_path: Path) -> None:
    """Several layers: each rotated by its own Q (from the seed and its module name), the same Q whether or not
    other layers are dissected with it."""
    common = ["test_resnet", "--backend", "timm", "--dataset", small_set, "--workers", "0", "--no-store", "--report",
              "tally", "--rotate", "0.7", "--rotate-seed", "3"]
    code, _, err = run_cli(*common, "--layer", "layer3", "--layer", "stage:-1", "--out", tmp_path / "two")
    assert code == 0, err
    code, _, err = run_cli(*common, "--layer", "layer4", "--out", tmp_path / "one")
    assert code == 0, err
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["provenance"]["rotation"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["provenance"]["rotation"]
    assert (two["alpha"], two["seed"]) == (0.7, 3) and set(two["layers"]) == {"layer3", "stage:-1"}
    assert two["layers"]["stage:-1"]["module"] == "layer4"
    assert two["layers"]["layer3"]["seed_sequence"] != two["layers"]["stage:-1"]["seed_sequence"]
    # stage:-1 is layer4: the same Q as layer4 dissected alone, so the same thresholds.
    assert two["layers"]["stage:-1"]["matrix_sha256"] == one["layers"]["layer4"]["matrix_sha256"]
    two_layers, one_layer = netdissection.load_results(tmp_path / "two"), netdissection.load_results(tmp_path / "one")
    assert np.array_equal(two_layers.layers["stage:-1"].thresholds, one_layer.layers["layer4"].thresholds)


@pytest.mark.slow
def test_compare_draws_detectors_against_alpha(run_cli: Any, small_set: Path, tmp_path: Path) -> None:
    from netdissection.compare.plots import curve_panels, rotation_series
    from netdissection.compare.rows import categories_of

    out = tmp_path / "cmp"
    code, stdout, err = run_cli("compare", "timm:test_resnet", "--rotate", "0,0.5", "--rotate", "1", "--dataset",
                                small_set, "--workers", "0", "--out", out, "--store", tmp_path / "store",
                                "--report", "tally")
    assert code == 0, err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["rotate"] for r in rows] == [0, 0.5, 1] and {r["rotate_seed"] for r in rows} == {0}
    assert len({r["key"] for r in rows}) == 3 and len({r["run"] for r in rows}) == 3
    header = (out / "compare.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("x") + 1] == "rotate"
    # A row is the model's own run at its α.
    own = netdissection.dissect("test_resnet", backend="timm", dataset=str(small_set), workers=0, rotate=0.5)
    (layer,) = own.layers.values()
    assert rows[1]["detectors"] == counts(own, layer.layer).detectors
    assert rows[1]["paper_unique"] == counts(own, layer.layer).paper_unique_total
    assert rows[1]["key"] != rows[0]["key"]
    # The curve: one group (the model), a point per α, a line per category in each rule's panel.
    series = rotation_series(rows)
    (group,) = series.values()
    assert [r["rotate"] for r in group["points"]] == [0, 0.5, 1]
    panels = curve_panels(series, categories_of(rows), "rotate")
    assert len(panels) == 2 and all(len(p.curves) == len(categories_of(rows)) for p in panels)
    assert panels[1].curves[0].ys == [float(r[f"{categories_of(rows)[0]}_paper_unique"]) for r in rows]
    svg = (out / "detectors_vs_rotation.svg").read_text()
    assert "α" in svg and (out / "detectors_vs_rotation.png").is_file()
    assert "detectors_vs_rotation.svg" in (out / "index.html").read_text()
    assert not (out / "detectors_by_layer.svg").exists()  # three α of one layer are not three layers
    # Run again: every α from the store.
    code, stdout, err = run_cli("compare", "timm:test_resnet", "--rotate", "0,0.5,1", "--dataset", small_set,
                                "--workers", "0", "--out", tmp_path / "again", "--store", tmp_path / "store",
                                "--report", "tally")
    assert code == 0 and "3 from the store" in stdout, err


@pytest.mark.parametrize(("args", "needles"), [
    (["--rotate", "1.5"], ["--rotate 1.5", "between 0"]),
    (["--rotate", "-0.1"], ["--rotate -0.1", "between 0"]),
    (["--rotate", "nan"], ["--rotate nan"]),
    (["--rotate-seed", "4"], ["--rotate-seed 4", "--rotate"]),
    (["--rotate", "0.5", "--rotate-seed", "-1"], ["--rotate-seed", "-1"]),
])
def test_bad_rotation_is_one_line(run_cli: Any, small_set: Path, args: list[str], needles: list[str]) -> None:
    code, _, err = run_cli("resnet18", "--dataset", small_set, "--no-store", *args)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(("args", "needles"), [
    (["--rotate", "0,2"], ["--rotate 2", "between 0"]),
    (["--rotate", "0,half"], ["--rotate", "'half'"]),
])
def test_bad_compare_rotation_is_one_line(run_cli: Any, small_set: Path, tmp_path: Path, args: list[str],
                                          needles: list[str]) -> None:
    code, _, err = run_cli("compare", "resnet18", "--dataset", small_set, "--out", tmp_path / "cmp", *args)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "cmp").exists()


def test_a_layer_too_wide_to_rotate_is_one_line(run_cli: Any, small_set: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is checked against the layer's units before any pass (lowered here to the test model's 96)."""
    monkeypatch.setattr(rot, "MAX_ROTATION_UNITS", 64)
    code, _, err = run_cli("test_resnet", "--backend", "timm", "--dataset", small_set, "--no-store", "--rotate", "0.5",
                           "--out", tmp_path / "out")
    assert_one_line_error(code, err, "'stage:-1' has 96 units", "at most 64 units", "GiB")
    assert not (tmp_path / "out" / "summary.json").exists()
    with pytest.raises(netdissection.DissectionError) as message:
        rot.check_units("wide", 10000)
    assert "3.7 GiB" in str(message.value)  # five 10000² float64 matrices
