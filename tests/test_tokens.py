"""Token and channels-last layers come out as ``(N, C, h, w)`` grids: prefix tokens dropped, patches in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import netdissection
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends import layouts
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
from netdissection.plugins.datasets.generated import generate_concept_set

PREFIX_VALUE = -1000.0


class PositionTokens(nn.Module):
    """Emits ViT-style tokens ``(N, prefix + gh·gw, C)`` whose every channel holds the token's patch index
    (row-major), and ``PREFIX_VALUE`` for the prefix tokens, which come first."""

    def __init__(self, prefix: int, patch: int = 16, channels: int = 3) -> None:
        super().__init__()
        self.prefix, self.patch, self.channels = prefix, patch, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        patches = (h // self.patch) * (w // self.patch)
        index = torch.arange(patches, dtype=torch.float32)
        values = torch.cat([torch.full((self.prefix,), PREFIX_VALUE), index])
        return values.view(1, -1, 1).expand(n, -1, self.channels).clone()


class TokenModel(nn.Module):
    def __init__(self, prefix: int, declare_prefix: bool) -> None:
        super().__init__()
        self.tokens = PositionTokens(prefix)
        if declare_prefix:
            self.num_prefix_tokens = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("declare_prefix", [True, False])
def test_tokens_become_the_patch_grid(prefix: int, declare_prefix: bool) -> None:
    """A 48×80 input at patch 16 is a 3×5 grid: position (i, j) must hold patch i·5 + j. Keeping the class
    token and dropping the last patch (the classic off-by-one) would put PREFIX_VALUE at (0, 0)."""
    backend = TorchvisionBackend(TokenModel(prefix, declare_prefix), BackendOptions())
    info = {i.name: i for i in backend.layers()}["tokens"]
    assert info.kind == "tokens"
    assert info.shape == (3, 14, 14)  # probed at 224×224
    maps = backend.activations(torch.zeros(2, 3, 48, 80), ["tokens"])["tokens"]
    assert maps.shape == (2, 3, 3, 5)
    expected = torch.arange(15, dtype=torch.float32).view(3, 5)
    for n in range(2):
        for c in range(3):
            torch.testing.assert_close(maps[n, c], expected)


def test_infer_prefix_and_patch_from_shape() -> None:
    assert layouts.detect((197, 768), (224, 224)) == layouts.Layout("tokens", 1, (16, 16))  # ViT-B/16
    assert layouts.detect((50, 768), (224, 224)) == layouts.Layout("tokens", 1, (32, 32))  # ViT-B/32
    assert layouts.detect((198, 384), (224, 224)) == layouts.Layout("tokens", 2, (16, 16))  # DeiT distilled
    assert layouts.detect((261, 384), (224, 224)) == layouts.Layout("tokens", 5, (14, 14))  # 1 + 4 registers, /14
    assert layouts.detect((196, 512), (224, 224)) == layouts.Layout("tokens", 0, (16, 16))  # Mixer: no prefix
    # A transposed (C, T) tensor and a pooled vector are no grid.
    assert layouts.detect((384, 197), (224, 224)).kind == "vector"
    assert layouts.detect((1000,), (224, 224)).kind == "vector"
    # What the model says wins over inference.
    assert layouts.detect((197, 8), (224, 224), prefix=1, patch=(16, 16)).prefix == 1


def test_channels_last_and_conv_are_told_apart() -> None:
    assert layouts.detect((768, 7, 7), (224, 224)).kind == "conv"
    assert layouts.detect((7, 7, 768), (224, 224)).kind == "channels_last"
    assert layouts.detect((56, 56, 96), (224, 224)).kind == "channels_last"
    assert layouts.detect((96, 28, 40), (224, 320)).kind == "conv"  # a non-square input
    assert layouts.detect((28, 40, 96), (224, 320)).kind == "channels_last"
    assert layouts.detect((6, 197, 64), (224, 224)).kind == "vector"  # attention heads × tokens × dims
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # (N, C, h, w)
    last = x.permute(0, 2, 3, 1).contiguous()  # (N, h, w, C)
    layout = layouts.detect(tuple(last.shape[1:]), (48, 60))
    assert layout.kind == "channels_last"
    assert layout.map_shape((4, 5, 3), (48, 60)) == (3, 4, 5)
    torch.testing.assert_close(layout.to_map(last, (48, 60)), x)


def test_grid_follows_the_batch_size() -> None:
    """A dynamic-size model: the grid is recomputed from each batch's own input size."""
    layout = layouts.detect((17, 8), (64, 64))  # 1 + 4×4 at 64 px
    assert layout == layouts.Layout("tokens", 1, (16, 16))
    assert layout.grid(1 + 6 * 10, (96, 160)) == (6, 10)
    assert layout.grid(1 + 7 * 10, (100, 160)) == (7, 10)  # padded up (timm's dynamic_img_pad)


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("tokens") / "set", images=8, image_size=64, seed=0)


def test_torchvision_vit_dissects_token_layers(concept_set: Path) -> None:
    """torchvision's VisionTransformer: encoder layers are (N, 1 + T, C) with a class token."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    backend = TorchvisionBackend(model, BackendOptions())
    info = {i.name: i for i in backend.layers()}["encoder.layers.encoder_layer_1"]
    assert (info.kind, info.shape) == ("tokens", (32, 4, 4))
    result = netdissection.dissect(model, dataset=concept_set, layers=["encoder.layers.encoder_layer_1"],
                                   batch_size=4, workers=0)
    layer = result.layers["encoder.layers.encoder_layer_1"]
    assert layer.units == 32 and result.images == 8
    assert layer.intersection.sum() > 0
