"""The sparse mask path equals thresholding the full bilinear upsampling written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from netdissection.core.upsample import active_pixels

from .bruteforce import bilinear


@pytest.mark.parametrize(("h", "w", "out_h", "out_w"), [
    (7, 7, 112, 112), (14, 14, 112, 112), (4, 4, 8, 8), (8, 8, 8, 8), (3, 5, 17, 9), (16, 16, 8, 8),
    (1, 1, 8, 8), (2, 3, 7, 13), (7, 7, 113, 113),
])
def test_active_pixels_equal_full_upsampling(h: int, w: int, out_h: int, out_w: int) -> None:
    rng = np.random.default_rng(h * 100 + out_h)
    maps = rng.standard_normal((12, h, w)).astype(np.float32)
    # Thresholds that are themselves source values make the edge ties matter.
    thresholds = np.array([np.sort(m.ravel())[-max(1, m.size // 5)] for m in maps], dtype=np.float64)
    thresholds[::3] -= 0.25
    pair, pixel = active_pixels(torch.from_numpy(maps), torch.from_numpy(thresholds), out_h, out_w)
    got = np.zeros((12, out_h * out_w), dtype=bool)
    got[pair.numpy(), pixel.numpy()] = True
    assert len(pair) == got.sum()  # no pixel reported twice
    for p in range(12):
        expected = bilinear(maps[p].astype(np.float64), out_h, out_w) > thresholds[p]
        np.testing.assert_array_equal(got[p].reshape(out_h, out_w), expected)
    assert got.any() or h * w == 1  # the case is not vacuous


def test_agrees_with_torch_interpolate_away_from_ties() -> None:
    torch.manual_seed(0)
    maps = torch.randn(64, 7, 7)
    thresholds = torch.full((64,), 1.234567, dtype=torch.float64)
    full = F.interpolate(maps.double()[:, None], size=(112, 112), mode="bilinear", align_corners=False)
    expected = full.reshape(64, -1) > thresholds[:, None]
    pair, pixel = active_pixels(maps, thresholds, 112, 112)
    got = torch.zeros_like(expected)
    got[pair, pixel] = True
    assert torch.equal(got, expected)
