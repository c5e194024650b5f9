"""Layers taken from the model itself: token grids from what the model says (never a factored token count),
torchvision's stages and default layers, attention probabilities refused, and the one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from netdissection.core.types import BackendOptions
from netdissection.plugins.backends import layouts
from netdissection.plugins.backends.timm_backend import TimmBackend
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error

RunCli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("layers") / "set", images=4, image_size=64, seed=0)


def _tokens_as_grid(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """(N, prefix + h·w, C) → (N, C, h, w): prefix first, patches row by row (the brute force)."""
    n, _, c = tokens.shape
    out = torch.empty(n, c, h, w)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, prefix + i * w + j, :]
    return out


def _hooked_output(model: torch.nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return seen[-1]


# ---- timm: token layers ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cait_blocks_are_14_by_14_patch_grids() -> None:
    """CaiT's ``blocks`` hold the 196 patch tokens alone (the class token joins in ``blocks_token_only``): at
    224 px a block is a 14×14 map equal to timm's own stage and to the tokens laid out row by row — not a
    15×13 grid of 195 tokens with the first patch dropped as if it were a class token."""
    backend = TimmBackend("cait_xxs24_224", BackendOptions())
    info = {i.name: i for i in backend.layers()}
    assert (info["blocks.3"].kind, info["blocks.3"].shape) == ("tokens", (192, 14, 14))
    assert info["stage:3"].module == "blocks.3" and info["stage:-1"].module == "blocks.23"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    raw: list[torch.Tensor] = []
    handle = backend.model.get_submodule("blocks.3").register_forward_hook(lambda _m, _i, out: raw.append(out))
    try:
        maps = backend.activations(x, ["blocks.3", "stage:3", "blocks.23"])  # stage:3: forward_intermediates
    finally:
        handle.remove()
    assert raw[-1].shape == (1, 196, 192)
    torch.testing.assert_close(maps["blocks.3"], _tokens_as_grid(raw[-1], 0, 14, 14))
    torch.testing.assert_close(maps["blocks.3"], maps["stage:3"], rtol=1e-5, atol=1e-5)
    assert maps["blocks.23"].shape == (1, 192, 14, 14)
    # Its class-attention blocks hold one token: no map, and they say why.
    token_only = info["blocks_token_only.0"]
    assert not token_only.spatial and "1 token, which fits no grid" in token_only.note


@pytest.mark.slow
@pytest.mark.parametrize(("model", "size", "stage", "resolved", "module", "prefix"), [
    ("deit_tiny_distilled_patch16_224", 64, "stage:-1", "blocks.11", "blocks.11", 2),  # class and distillation
    ("pvt_v2_b0", 64, "stage:2", "stages.2", "stages.2.norm", 0),  # a hierarchical model's tokens at 1/16
    # The second branch: 224 px at patch 16 and 1 class token, which the model does not declare.
    ("crossvit_tiny_240", None, "stage:-1", "blocks.2.blocks.1", "blocks.2.blocks.1", 1),
])
def test_module_token_layers_take_the_models_grid(model: str, size: int | None, stage: str, resolved: str,
                                                  module: str, prefix: int) -> None:
    """A module path's tokens become the grid the model says, and equal timm's stage map that they are."""
    backend = TimmBackend(model, BackendOptions(input_size=(size, size) if size else None))
    info = {i.name: i for i in backend.layers()}
    assert info[stage].module == resolved
    assert info[module].kind == "tokens"
    hw = backend.fixed_size or (size, size)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(2))  # type: ignore[misc]
    maps = backend.activations(x, [module, stage])
    torch.testing.assert_close(maps[module], maps[stage], rtol=1e-4, atol=1e-4)
    raw = _hooked_output(backend.model, module, x.contiguous(memory_format=torch.channels_last))
    _, _, h, w = maps[module].shape
    assert raw.shape[1] == prefix + h * w
    torch.testing.assert_close(maps[module], _tokens_as_grid(raw, prefix, h, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model", "layers"), [
    # A stage, a module inside it, and one that runs after the last stage (forward_intermediates runs on).
    ("efficientnet_b0", ["stage:1", "blocks.1.0", "conv_head"]),
    # A container forward_intermediates never calls: the stage comes through the module it resolved to.
    ("convnext_atto", ["stage:-1", "stages", "stages.1.blocks.0"]),
])
def test_stages_and_modules_share_one_pass(model: str, layers: list[str]) -> None:
    backend = TimmBackend(model, BackendOptions(input_size=(64, 64)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    passes = []

    def count(module: torch.nn.Module, args: tuple[object, ...]) -> None:
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            passes.append(module)

    backend.activations(x, layers)  # the first batch also finds the batch norms to fold, on 2 images
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        maps = backend.activations(x, layers)
    finally:
        handle.remove()
    assert len(passes) == 1
    model_ = backend.model
    xs = x.contiguous(memory_format=torch.channels_last)
    for layer in layers:
        if layer.startswith("stage:"):
            with torch.inference_mode():
                expected = model_.forward_intermediates(xs, indices=[int(layer.split(":")[1])],
                                                        intermediates_only=True, output_fmt="NCHW")[0]
        else:
            expected = _hooked_output(model_, layer, xs)
        torch.testing.assert_close(maps[layer], expected.contiguous(), rtol=1e-5, atol=1e-5)


def test_without_forward_intermediates_stages_are_timms_feature_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture without ``forward_intermediates`` takes its stages where ``features_only`` does: the
    ``feature_info`` modules' outputs."""
    import timm
    from timm.models.resnet import ResNet

    def missing(*_args: object, **_kwargs: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(ResNet, "forward_intermediates", missing)
    backend = TimmBackend("resnet10t", BackendOptions(input_size=(64, 64)))
    assert backend.describe()["stages_from"] == "feature_info hooks"
    assert backend.describe()["stages"] == {"stage:0": "act1", "stage:1": "layer1", "stage:2": "layer2",
                                            "stage:3": "layer3", "stage:4": "layer4"}
    features = timm.create_model("resnet10t", features_only=True).eval()
    features.load_state_dict(backend.model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = features(x)[-1]
    torch.testing.assert_close(backend.activations(x, ["stage:-1"])["stage:-1"], expected, rtol=1e-5, atol=1e-5)


def test_strict_token_layouts_never_factor() -> None:
    # 196 tokens with a declared class token: the model's own grid (no prefix in this layer), not 195 = 15×13.
    assert layouts.model_token_layout(196, (224, 224), [(16, 16)], [1, 0]) == layouts.Layout("tokens", 0, (16, 16),
                                                                                             strict=True)
    assert layouts.model_token_layout(197, (224, 224), [(16, 16)], [1, 0]).prefix == 1  # type: ignore[union-attr]
    assert layouts.model_token_layout(195, (224, 224), [(16, 16)], [1, 0]) is None
    layout = layouts.model_token_layout(17, (64, 64), [(16, 16)], [1, 0])
    assert layout is not None and layout.grid(1 + 4 * 6, (64, 96)) == (4, 6)  # another batch size
    with pytest.raises(ValueError, match="do not fit the model's grid of 4×6"):
        layout.grid(1 + 23, (64, 96))


def test_attention_probabilities_are_told_from_maps() -> None:
    scores = torch.randn(2, 3, 17, 17)
    assert layouts.attention_probabilities(scores.softmax(dim=-1))
    assert not layouts.attention_probabilities(scores)
    assert not layouts.attention_probabilities(scores.relu())
    assert not layouts.attention_probabilities(scores.softmax(dim=1))  # a softmax over channels is a map


# ---- torchvision: stages and defaults ------------------------------------------------------------------------

TORCHVISION_DEFAULTS = [  # model, the last stage's module, its map at 224 px
    ("resnet18", "layer4", (512, 7, 7)),
    ("vgg16", "features.29", (512, 14, 14)),  # conv5_3's ReLU, before the pool (the paper's conv5_3)
    ("densenet121", "features.denseblock4", (1024, 7, 7)),  # not the final BatchNorm
    ("efficientnet_b0", "features.7", (320, 7, 7)),  # not the 1×1 head conv to 1280
    ("mobilenet_v3_small", "features.12", (576, 7, 7)),
    ("convnext_tiny", "features.7", (768, 7, 7)),
    ("vit_b_16", "encoder.layers.encoder_layer_11", (768, 14, 14)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "module", "shape"), TORCHVISION_DEFAULTS, ids=[m for m, *_ in TORCHVISION_DEFAULTS])
def test_torchvision_default_is_the_last_stage(model: str, module: str, shape: tuple[int, int, int]) -> None:
    """The default layer is stage:-1, the last stage at full resolution, and its maps are what torchvision's
    own ``create_feature_extractor`` returns for that node (checked where the node is picked by a rule: the
    ReLU before a pool, the last block of a resolution, an encoder block's tokens)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    backend = TorchvisionBackend(model, BackendOptions())
    assert backend.select_layers(None) == ["stage:-1"]
    info = {i.name: i for i in backend.layers()}["stage:-1"]
    assert (info.module, info.shape) == (module, shape)
    if model in ("resnet18", "densenet121", "convnext_tiny"):
        return  # a stage that is a named block: its output is the node's by definition
    size = 224 if model == "vit_b_16" else 64  # torchvision's ViT takes its own size only
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    ours = backend.activations(x, ["stage:-1"])["stage:-1"]
    with torch.inference_mode():
        node = create_feature_extractor(backend.model, return_nodes=[module])(x)[module]
    if node.ndim == 3:  # encoder tokens: the class token first, then the 14×14 patches
        node = _tokens_as_grid(node, 1, 14, 14)
    torch.testing.assert_close(ours, node, rtol=1e-4, atol=1e-4)


# ---- errors through the CLI: one line, exit status 2 ----------------------------------------------------------

def test_stage_out_of_range(run_cli: RunCli, concept_set: Path) -> None:
    code, _, err = run_cli("resnet18", "--layer", "stage:9", "--dataset", concept_set)
    assert_one_line_error(code, err, "stage:9 is out of range", "4 stages", "stage:-1")
    assert "--backend timm" not in err.splitlines()[-1]  # timm's resnet18 has 5 stages: no stage:9 either


def test_unknown_layer_names_timm_when_timm_has_it(run_cli: RunCli, concept_set: Path) -> None:
    """resnet18 is torchvision's; a layer only timm's resnet18 has gets the way to it, close matches or not."""
    code, _, err = run_cli("resnet18", "--layer", "act1", "--dataset", concept_set)
    assert_one_line_error(code, err, "'act1'", "timm's resnet18 has a layer 'act1'", "--backend timm")
    notices = [line for line in err.splitlines() if line.startswith("INFO")]
    assert len(notices) == 1 and "torchvision's model" in notices[0] and "--backend timm" in notices[0]
    code, _, err = run_cli("resnet18", "--layer", "stage:4", "--dataset", concept_set)
    assert_one_line_error(code, err, "stage:4 is out of range", "timm's resnet18 has stage:4", "--backend timm")


@pytest.mark.slow
def test_attention_probabilities_are_refused(run_cli: RunCli, concept_set: Path) -> None:
    layer = "blocks.0.fusion.0.attn.attn_drop"
    code, out, err = run_cli("layers", "crossvit_tiny_240")
    assert code == 0, err
    assert layer not in out and "blocks.2.blocks.1  (default)" in out
    code, _, err = run_cli("crossvit_tiny_240", "--layer", layer, "--dataset", concept_set)
    assert_one_line_error(code, err, repr(layer), "attention probabilities", "not a map of units")


def test_tokens_off_the_grid_are_refused(run_cli: RunCli, concept_set: Path) -> None:
    code, _, err = run_cli("cait_xxs24_224", "--input-size", "64", "--layer", "blocks_token_only.0",
                           "--dataset", concept_set)
    assert_one_line_error(code, err, "'blocks_token_only.0'", "1 token, which fits no grid", "4×4")


def test_a_size_the_model_cannot_take(run_cli: RunCli, concept_set: Path) -> None:
    code, _, err = run_cli("crossvit_tiny_240", "--input-size", "64", "--dataset", concept_set)
    assert_one_line_error(code, err, "crossvit_tiny_240 does not run at 64×64", "leave out --input-size")
