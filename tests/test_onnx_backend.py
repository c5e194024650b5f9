"""The ONNX backend: detection by suffix, layers from shape inference, one run per batch, bad files."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import netdissection
from netdissection.core.errors import MissingExtraError
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends.onnx_backend import OnnxBackend
from netdissection.plugins.backends.torch_common import file_sha256
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error

LAYER3 = "/layer3/layer3.1/relu_1/Relu_output_0"
LAYER4 = "/layer4/layer4.1/relu_1/Relu_output_0"


def export_onnx(model: nn.Module, path: Path, size: int = 64, *, batch: int = 1, dynamic_batch: bool = True,
                dynamic_size: bool = True) -> Path:
    """Export with the TorchScript exporter (0.2 s; names follow module paths). Dynamic H, W by default, so
    the graph takes the dataset's images at their stored size."""
    axes: dict[int, str] = {0: "batch"} if dynamic_batch else {}
    if dynamic_size:
        axes.update({2: "height", 3: "width"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, and says so
        torch.onnx.export(model.eval(), (torch.zeros(batch, 3, size, size),), str(path), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": {0: "batch"} if dynamic_batch else {}})
    return path


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().eval()




@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("onnx") / "set", images=12, image_size=64, seed=0)


@pytest.fixture(scope="module")
def r18_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(resnet18(), tmp_path_factory.mktemp("models") / "r18.onnx")


class RunCounter:
    """Counts ``InferenceSession.run`` calls, running the real method."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import onnxruntime

        self.calls = 0
        real = onnxruntime.InferenceSession.run

        def run(session, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            return real(session, *args, **kwargs)

        monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)


def test_cli_detects_onnx_and_dissects(run_cli: Callable[..., tuple[int, str, str]], r18_onnx: Path,
                                      concept_set: Path, tmp_path: Path) -> None:
    code, _out, err = run_cli(r18_onnx, "--dataset", concept_set, "--out", tmp_path / "o", "--workers", "0",
                              "--batch-size", "6", "--report", "tally")
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    details = summary["provenance"]["backend_details"]
    assert summary["provenance"]["backend"] == "onnx"
    assert summary["layers"][0]["layer"] == LAYER4  # the last tensor with a spatial map
    assert details["sha256"] == file_sha256(r18_onnx)
    assert details["model"] == str(r18_onnx)
    assert details["opset"]["ai.onnx"] >= 13
    assert "CPUExecutionProvider" in details["providers"]
    assert details["onnxruntime"] and details["batch"] == "dynamic"
    assert (tmp_path / "o" / next(p for p in summary["written"] if p.endswith("tally.csv"))).is_file()


def test_layers_lists_tensors_with_shapes(run_cli: Callable[..., tuple[int, str, str]], r18_onnx: Path) -> None:
    code, out, err = run_cli("layers", r18_onnx)
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if LAYER4 in line)
    assert "512" in lines[at] and "7 × 7" in lines[at]  # probed at 224 px (dynamic H, W)
    assert "(default)" in lines[at] + lines[at + 1]  # the marker may wrap on a narrow terminal
    assert "logits" not in out  # not spatial: only with --all
    code, out, _ = run_cli("layers", r18_onnx, "--all")
    assert "logits" in out


def test_one_run_per_batch_serves_every_layer(monkeypatch: pytest.MonkeyPatch, r18_onnx: Path,
                                              concept_set: Path) -> None:
    counter = RunCounter(monkeypatch)
    layers = ["/layer2/layer2.1/relu_1/Relu_output_0", LAYER3, LAYER4]
    result = netdissection.dissect(str(r18_onnx), dataset=concept_set, layers=layers, batch_size=4, workers=0)
    assert list(result.layers) == layers
    assert counter.calls == 3  # 12 images in batches of 4; shape inference needed no probe run


def test_fixed_batch_is_split_and_padded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, r18_onnx: Path) -> None:
    fixed = OnnxBackend(export_onnx(resnet18(), tmp_path / "b4.onnx", batch=4, dynamic_batch=False),
                        BackendOptions())
    dynamic = OnnxBackend(r18_onnx, BackendOptions())
    assert fixed.describe()["batch"] == 4
    x = torch.randn(6, 3, 64, 64)
    counter = RunCounter(monkeypatch)
    got = fixed.activations(x, [LAYER3, LAYER4])
    assert counter.calls == 2  # 4 + (2 padded to 4)
    want = dynamic.activations(x, [LAYER3, LAYER4])
    for name in (LAYER3, LAYER4):
        assert got[name].shape[0] == 6
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_fixed_size_graph_gets_resized_batches(tmp_path: Path) -> None:
    """A graph with fixed H, W = 96 takes 64 px images resized bilinearly (the documented behaviour)."""
    model = resnet18()
    backend = OnnxBackend(export_onnx(model, tmp_path / "s96.onnx", size=96, dynamic_size=False),
                          BackendOptions(input_size=(64, 64)))
    assert backend.input_spec().size == (96, 96)
    assert {i.name: i.shape for i in backend.layers()}[LAYER4] == (512, 3, 3)
    x = torch.randn(2, 3, 64, 64)
    got = backend.activations(x, [LAYER4])[LAYER4]
    resized = nn.functional.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        want = nn.Sequential(*list(model.children())[:-2])(resized)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_channels_last_input_graph(tmp_path: Path, r18_onnx: Path) -> None:
    """A graph taking (N, H, W, 3) images (as TensorFlow exports do) gets them in that layout."""
    model = resnet18()

    class TakesNHWC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2))

    path = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TakesNHWC().eval(), (torch.zeros(1, 64, 64, 3),), str(path), dynamo=False,
                          input_names=["image"], dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}})
    nhwc = OnnxBackend(path, BackendOptions())
    assert nhwc.describe()["input"]["layout"] == "NHWC"
    x = torch.randn(2, 3, 64, 64)
    name = "/net/layer4/layer4.1/relu_1/Relu_output_0"
    torch.testing.assert_close(nhwc.activations(x, [name])[name],
                               OnnxBackend(r18_onnx, BackendOptions()).activations(x, [LAYER4])[LAYER4],
                               rtol=1e-4, atol=1e-5)


def test_vit_onnx_token_layers_become_grids(tmp_path: Path, concept_set: Path) -> None:
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=64, depth=4)
    path = export_onnx(vit, tmp_path / "vit.onnx", dynamic_size=False)
    backend = OnnxBackend(path, BackendOptions())
    last_block = {i.name: i for i in backend.layers()}["/blocks/blocks.3/Add_1_output_0"]
    assert (last_block.kind, last_block.shape) == ("tokens", (384, 4, 4))
    assert backend.layouts[last_block.name].prefix == 1
    result = netdissection.dissect(str(path), dataset=concept_set, batch_size=6, workers=0)
    (name, layer), = result.layers.items()
    assert name == "/norm/LayerNormalization_output_0"  # the last token layer before the class-token pick
    assert layer.units == 384 and np.isfinite(layer.thresholds).all()


# ---- bad input ---------------------------------------------------------------------------------------------

def test_file_that_is_not_onnx(run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
                               concept_set: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff\xfe at all" * 10)
    code, _, err = run_cli(bad, "--dataset", concept_set)
    assert_one_line_error(code, err, str(bad), "not an ONNX model")
    bad.write_bytes(b"")
    code, _, err = run_cli("layers", bad)
    assert_one_line_error(code, err, "not an ONNX model")


def test_missing_onnx_file(run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    code, _, err = run_cli("layers", tmp_path / "nowhere.onnx")
    assert_one_line_error(code, err, "nowhere.onnx", "does not exist")


def test_unknown_tensor_suggests_close_names(run_cli: Callable[..., tuple[int, str, str]], r18_onnx: Path,
                                            concept_set: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(r18_onnx, "--layer", "/layer4/layer4.1/relu_2/Relu_output_0", "--dataset", concept_set,
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "relu_2", LAYER4)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_tensor_without_spatial_map(run_cli: Callable[..., tuple[int, str, str]], r18_onnx: Path,
                                    concept_set: Path) -> None:
    code, _, err = run_cli(r18_onnx, "--layer", "logits", "--dataset", concept_set)
    assert_one_line_error(code, err, "'logits'", "no spatial map")


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch, r18_onnx: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it looks like
    with pytest.raises(MissingExtraError, match=r"onnxruntime.*netdissection\[onnx\]"):
        OnnxBackend(r18_onnx, BackendOptions())
