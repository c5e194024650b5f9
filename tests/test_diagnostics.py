"""Degenerate layers are named: spatially constant maps, thresholds at the units' floor, masks that never fire."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netdissection
from netdissection.core.diagnostics import UnitStatistics, layer_warnings
from netdissection.plugins.datasets.generated import generate_concept_set


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("diagnostics") / "set", images=8, image_size=64, seed=0)


# ---- the accumulator against a brute force ---------------------------------------------------------------------

def _brute_force(acts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = acts.double().numpy()
    n, units = a.shape[:2]
    minimum = np.array([a[:, u].min() for u in range(units)])
    maximum = np.array([a[:, u].max() for u in range(units)])
    varies = np.array([any(a[i, u].max() > a[i, u].min() for i in range(n)) for u in range(units)])
    return minimum, maximum, varies


def test_statistics_stream_and_merge_like_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(10, 6, 3, 4, generator=generator)
    acts[:, 2] = torch.randn(10, 1, 1, generator=generator)  # unit 2: a constant map in every image
    acts[3, 4] = 7.0  # unit 4: constant in one image only, so it still varies
    minimum, maximum, varies = _brute_force(acts)
    whole = UnitStatistics()
    for batch in acts.split(3):
        whole.update(batch)
    first, second = UnitStatistics(), UnitStatistics()
    first.update(acts[:4])
    second.update(acts[4:])
    for stats in (whole.result(), first.merge(second).result()):
        np.testing.assert_array_equal(stats.minimum, minimum)
        np.testing.assert_array_equal(stats.maximum, maximum)
        np.testing.assert_array_equal(stats.varies, varies)
        assert stats.map_shape == (6, 3, 4) and stats.images == 10
    assert varies.tolist() == [True, True, False, True, True, True]


def test_warnings_from_statistics() -> None:
    stats = UnitStatistics()
    stats.update(torch.zeros(2, 4, 3, 3))
    stats.update(torch.full((1, 4, 3, 3), -1.0))  # another value in another image: constant maps, not dead units
    result = stats.result()
    said = layer_warnings(result, np.full(4, -1.0), np.zeros((4, 2), dtype=np.int64))
    assert [w.split(":")[0] for w in said] == ["spatially constant maps", "thresholds at the minimum", "no masks"]
    assert "4 of 4 units" in said[0] and "3×3 positions" in said[0]
    # A dead unit (one value everywhere, in every image) is a unit at its floor, not a map without space.
    dead = UnitStatistics()
    dead.update(torch.zeros(3, 4, 3, 3))
    said = layer_warnings(dead.result(), np.zeros(4), np.ones((4, 2)))
    assert [w.split(":")[0] for w in said] == ["thresholds at the minimum"]


# ---- through a run ---------------------------------------------------------------------------------------------

class Broadcast(nn.Module):
    """Each unit's spatial mean at every position: a map that is constant within each image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()


class Degenerate(nn.Module):
    """A normal convolution, then (as RepVGG's final_conv) an Identity after a ReLU that most units never pass,
    and a spatially constant layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        with torch.no_grad():
            self.conv.bias[2:] = -100.0  # units 2..7 stay below 0 on any image: ReLU holds them at 0
        self.relu = nn.ReLU()
        self.final_conv = nn.Identity()
        self.constant = Broadcast()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.constant(y) + self.final_conv(self.relu(y))


def test_degenerate_layers_are_named(concept_set: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        result = netdissection.dissect(Degenerate(), dataset=concept_set, layers=["conv", "final_conv", "constant"],
                                       out=tmp_path / "out", workers=0, batch_size=4)
    assert result.layers["conv"].warnings == []  # the normal one
    identity = result.layers["final_conv"].warnings
    assert len(identity) == 1 and identity[0].startswith("thresholds at the minimum: 6 of 8 units")
    constant = result.layers["constant"].warnings
    assert constant and constant[0].startswith("spatially constant maps: 8 of 8 units")
    # In summary.json, per layer ...
    summary = {e["layer"]: e for e in json.loads((tmp_path / "out" / "summary.json").read_text())["layers"]}
    assert {name: e["warnings"] for name, e in summary.items()} == {
        name: layer.warnings for name, layer in result.layers.items()}
    # ... and in the terminal (the log), naming the layer.
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("layer final_conv: thresholds at the minimum") for m in logged)
    assert not any(m.startswith("layer conv:") for m in logged)


def test_repvgg_final_conv_through_the_cli(run_cli: Callable[..., tuple[int, str, str]], concept_set: Path,
                                           tmp_path: Path) -> None:
    """RepVGG's last stage is ``final_conv``, an Identity: with random weights half its units never rise above 0."""
    code, _, err = run_cli("repvgg_a0", "--input-size", "64", "--dataset", concept_set, "--out", tmp_path / "o",
                           "--report", "tally")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "layer stage:-1: thresholds at the minimum:" in flat
    layer = json.loads((tmp_path / "o" / "summary.json").read_text())["layers"][0]
    assert layer["module"] == "final_conv" and layer["warnings"][0].startswith("thresholds at the minimum")
