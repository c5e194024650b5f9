"""Planted detectors: a model whose units are built to fire on known concepts is labelled with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netdissection
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.generated import PALETTE, generate_concept_set

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def feature_bank(x: torch.Tensor) -> torch.Tensor:
    """Fixed multi-scale features of RGB in [0, 1] at half resolution: local means and contrasts."""
    half = F.avg_pool2d(x, 2)
    features = [half]
    for k in (3, 7, 15):
        mean = F.avg_pool2d(half, k, stride=1, padding=k // 2, count_include_pad=False)
        square = F.avg_pool2d(half * half, k, stride=1, padding=k // 2, count_include_pad=False)
        features += [mean, (square - mean * mean).clamp(min=0).sqrt()]
    return torch.cat([*features, torch.ones_like(half[:, :1])], dim=1)


class PlantedModel(nn.Module):
    """Three units at half resolution: 0 fires on red, 1 on textured regions, 2 on car silhouettes."""

    def __init__(self, car_readout: torch.Tensor) -> None:
        super().__init__()
        self.red = torch.tensor(PALETTE["red-c"], dtype=torch.float32).view(1, 3, 1, 1) / 255
        self.register_buffer("car_readout", car_readout.view(1, -1, 1, 1))
        self.units = nn.Identity()  # the dissected layer

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        x = normalised * STD + MEAN
        half = F.avg_pool2d(x, 2)
        red = torch.exp(-((half - self.red) ** 2).sum(1, keepdim=True) / (2 * 0.12**2))
        # Texture: local contrast (std over 5×5), pooled widely so a lone edge scores low and a pattern high.
        mean = F.avg_pool2d(half, 5, stride=1, padding=2, count_include_pad=False)
        square = F.avg_pool2d(half * half, 5, stride=1, padding=2, count_include_pad=False)
        contrast = (square - mean * mean).clamp(min=0).sum(1, keepdim=True).sqrt()
        texture = F.avg_pool2d(contrast, 15, stride=1, padding=7, count_include_pad=False)
        car = (feature_bank(x) * self.car_readout).sum(1, keepdim=True)
        return self.units(torch.cat([red, texture, car], dim=1))


def fit_car_readout(root: Path) -> torch.Tensor:
    """Least squares from the feature bank to the car silhouettes of a training set (closed form)."""
    data = BrodenDataset(root)
    car = next(c.number for c in data.vocabulary.concepts if c.name == "car")
    rows, targets = [], []
    for i in range(len(data)):
        s = data.load(i)
        x = torch.from_numpy(np.array(s.image)).permute(2, 0, 1)[None].float() / 255
        rows.append(feature_bank(x)[0].flatten(1).T)
        targets.append(torch.from_numpy((s.layers == car).any(0).astype(np.float32)).flatten())
    a, b = torch.cat(rows).double(), torch.cat(targets).double()
    solution = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    return solution.float()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> netdissection.RunResult:
    tmp = tmp_path_factory.mktemp("planted")
    train = generate_concept_set(tmp / "train", images=60, image_size=64, seed=11)
    test = generate_concept_set(tmp / "test", images=90, image_size=64, seed=12)
    model = PlantedModel(fit_car_readout(train)).eval()
    return netdissection.dissect(model, dataset=str(test), layers=["units"], quantile=0.1, workers=0,
                                 out=tmp / "out")


def test_planted_units_get_their_concepts(planted: netdissection.RunResult) -> None:
    from netdissection.core.scores import unit_scores

    rows = {r.unit: r for r in unit_scores(planted.layers["units"])}
    assert (rows[1].label, rows[1].category) == ("red-c", "color"), rows[1]
    assert rows[2].category == "texture", rows[2]
    assert (rows[3].label, rows[3].category) == ("car", "object"), rows[3]
    for r in rows.values():
        assert r.score > 0.1, r
