"""The timm backend, backend detection and listing: any timm architecture, stages by index, clear errors."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import netdissection
from netdissection.api import resolve_backend
from netdissection.core.errors import UnknownNameError
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends.timm_backend import TimmBackend, reachable
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.registry import build_host

from .cli_checks import assert_one_line_error


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("timm") / "set", images=8, image_size=64, seed=0)


class ForwardCounter:
    """Counts passes through a network however it is entered (``forward``, timm's ``forward_intermediates``),
    by batch size: calls of a convolution on the 3-channel input images, through torch's global forward
    pre-hook. The probe passes run one image; the dataset's batches run ``batch_size``."""

    def __init__(self) -> None:
        self.by_batch: Counter[int] = Counter()

    def __call__(self, module: torch.nn.Module, args: tuple[object, ...]) -> None:
        x = args[0] if args else None
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3 and isinstance(x, torch.Tensor):
            self.by_batch[int(x.shape[0])] += 1


@pytest.fixture
def count_forwards() -> Iterator[Callable[..., ForwardCounter]]:
    handles = []

    def install() -> ForwardCounter:
        counter = ForwardCounter()
        handles.append(torch.nn.modules.module.register_module_forward_pre_hook(counter))
        return counter

    yield install
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(("model", "module_layer", "stage_units"), [
    ("resnet50", "layer2.0.conv1", (64, 2048)),  # timm's first resnet stage is the stem (act1)
    ("convnext_tiny", "stages.1.blocks.0.mlp.fc1", (96, 768)),  # a channels-last (N, h, w, C) output
    ("vit_small_patch16_224", "blocks.5.attn", (384, 384)),  # tokens with a class token
    ("efficientnet_b0", "blocks.3", (16, 320)),
])
def test_end_to_end(model: str, module_layer: str, stage_units: tuple[int, int], concept_set: Path,
                    count_forwards: Callable[..., ForwardCounter]) -> None:
    counter = count_forwards()
    layers = ["stage:0", "stage:-1", module_layer]
    result = netdissection.dissect(model, backend="timm", dataset=concept_set, layers=layers, batch_size=4,
                                   workers=0)
    # 8 images in 2 batches: one pass each serves all three layers (and where batch norms were folded, a pass of
    # 2 images of the first batch showed which ones, and checks the folded model).
    assert counter.by_batch[4] == 2
    folded = result.provenance["backend_details"].get("batchnorms_folded", 0)
    assert counter.by_batch[2] == (1 if folded else 0)
    assert list(result.layers) == layers
    assert (result.layers["stage:0"].units, result.layers["stage:-1"].units) == stage_units
    for layer in result.layers.values():
        assert np.isfinite(layer.thresholds).all()
        assert layer.truth.sum() > 0 and layer.intersection.sum() > 0
    details = result.provenance["backend_details"]
    assert result.provenance["backend"] == "timm" and details["timm"] == timm.__version__
    assert details["stages"]["stage:0"]


def test_torchvision_one_forward_per_batch(concept_set: Path, count_forwards: Callable[..., ForwardCounter]) -> None:
    counter = count_forwards()
    netdissection.dissect("resnet18", dataset=concept_set, layers=["layer2", "layer3", "stage:-1"], batch_size=4,
                          workers=0)
    assert counter.by_batch[4] == 2 and counter.by_batch[1] == 1  # the probe, then one pass per batch


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of a rich table printed by the CLI, by their first cell."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") >= 4]
    return {row[0]: row for row in rows}


def test_stage_layers_and_modules_are_listed(run_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = run_cli("layers", "convnext_tiny", "--backend", "timm")
    assert code == 0, err
    rows = table_rows(out)
    assert "stages.0.blocks.0.conv_dw" in rows  # module names, with the stages beside the modules they are
    assert rows["stages.0"][1] == "stage:0 stage:-4"
    assert rows["stages.3  (default)"][1:] == ["stage:3 stage:-1", "conv", "768", "7 × 7"]
    assert rows["stages.0.blocks.0.mlp.fc1"][2] == "channels_last"
    assert "head.fc" not in rows and "head.global_pool" not in rows  # no 1×1 maps, no vectors ...
    code, out, err = run_cli("layers", "convnext_tiny", "--backend", "timm", "--all")
    assert code == 0, err
    assert table_rows(out)["head.fc"][2] == "vector"  # ... unless --all


def test_preprocessing_from_timm_and_user_overrides() -> None:
    vit = TimmBackend("vit_small_patch16_224", BackendOptions(input_size=(64, 64)))
    spec = vit.input_spec()
    assert (spec.mean, spec.std, spec.size) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (64, 64))
    assert {i.name: i.shape for i in vit.layers()}["stage:-1"] == (384, 4, 4)  # img_size follows --input-size
    mine = TimmBackend("efficientnet_b0", BackendOptions(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0), bgr=True))
    spec = mine.input_spec()
    assert (spec.mean, spec.std, spec.channel_order, spec.size) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0), "BGR",
                                                                    (224, 224))


def test_detection_order() -> None:
    host = build_host()
    assert resolve_backend(host, "resnet18", None) == "torchvision"  # both know it: torchvision first
    assert resolve_backend(host, "convnext_tiny", None) == "torchvision"  # likewise
    assert resolve_backend(host, "vit_small_patch16_224", None) == "timm"
    assert resolve_backend(host, "resnet50.a1_in1k", None) == "timm"  # a pretrained tag
    assert resolve_backend(host, "some/dir/model.onnx", None) == "onnx"
    assert resolve_backend(host, "resnet18", "timm") == "timm"  # --backend overrides
    with pytest.raises(UnknownNameError, match="resnet18"):
        resolve_backend(host, "resnet188", None)


def test_backends_command_lists_order_and_accepts(run_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = run_cli("backends")
    assert code == 0, err
    order = [name for name in ("onnx", "torchvision", "timm") if f"│ {name} " in out]
    assert order == ["onnx", "torchvision", "timm"]
    assert "order" in out and "accepts" in out and "runtimes" in out
    # What --runtime each backend takes (the cell may be cut short in a narrow terminal).
    assert "│ onnxrunti" in out.split("│ onnx ")[1].split("\n")[0]


# ---- bad input ---------------------------------------------------------------------------------------------

def test_unknown_timm_name_suggests_close_names(run_cli: Callable[..., tuple[int, str, str]],
                                                concept_set: Path) -> None:
    code, _, err = run_cli("convnxt_tiny", "--backend", "timm", "--dataset", concept_set)
    assert_one_line_error(code, err, "convnxt_tiny", "convnext_tiny")
    code, _, err = run_cli("convnxt_tiny", "--dataset", concept_set)  # no --backend: every name-based backend
    assert_one_line_error(code, err, "convnxt_tiny", "convnext_tiny")


def test_checkpoint_of_another_architecture(run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                                            concept_set: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    code, _, err = run_cli("resnet34", "--backend", "timm", "--weights", weights, "--dataset", concept_set)
    assert_one_line_error(code, err, "resnet18.pth", "resnet34", "missing")
    code, _, err = run_cli("efficientnet_b0", "--backend", "timm", "--weights", weights, "--dataset", concept_set)
    assert_one_line_error(code, err, "efficientnet_b0", "missing", "unexpected")
    assert re.search(r"\d+ missing .* \d+ unexpected", err), err


def test_pretrained_offline_fails_fast(run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                                       concept_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # empty caches: nothing to fall back on
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    started = time.perf_counter()
    code, _, err = run_cli("resnet50", "--backend", "timm", "--pretrained", "--dataset", concept_set)
    assert time.perf_counter() - started < 20
    assert_one_line_error(code, err, "resnet50", "HF_HUB_OFFLINE", "--weights")


def test_unreachable_host_is_detected_within_the_timeout() -> None:
    started = time.perf_counter()
    assert not reachable("192.0.2.1", 443, timeout=0.5)  # TEST-NET-1: never routed
    assert time.perf_counter() - started < 3


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from netdissection.core.errors import MissingExtraError
    from netdissection.plugins.backends import timm_backend

    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without it looks like
    with pytest.raises(MissingExtraError, match=r"timm.*netdissection\[timm\]"):
        TimmBackend("convnext_tiny", BackendOptions())
    assert timm_backend.dissect_detect_backend(model_ref="vit_small_patch16_224") is None
