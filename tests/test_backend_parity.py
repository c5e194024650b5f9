"""One result whatever the framework: the same weights through torchvision or timm and through their ONNX
export give the same thresholds and the same unit labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import netdissection
from netdissection.core.scores import iou_matrix
from netdissection.core.types import LayerResult
from netdissection.plugins.datasets.generated import generate_concept_set

from .test_onnx_backend import export_onnx, resnet18

#: Units whose best IoU beats the runner-up by less than this may swap labels on float noise.
MARGIN = 1e-3


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("parity") / "set", images=24, image_size=64, seed=0)


def assert_same_dissection(a: LayerResult, b: LayerResult) -> None:
    np.testing.assert_allclose(a.thresholds, b.thresholds, rtol=1e-4, atol=1e-6)
    concept = a.vocabulary.primary_category_index() >= 0
    iou_a, iou_b = iou_matrix(a)[:, concept], iou_matrix(b)[:, concept]
    ordered = np.sort(iou_a, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > MARGIN
    assert clear.mean() > 0.5, "too few units with a clear best label to compare"
    np.testing.assert_array_equal(iou_a[clear].argmax(axis=1), iou_b[clear].argmax(axis=1))
    np.testing.assert_allclose(iou_a, iou_b, atol=0.02)


def test_torchvision_and_onnx_agree(tmp_path: Path, concept_set: Path) -> None:
    model = resnet18(seed=7)
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    onnx_file = export_onnx(model, tmp_path / "resnet18.onnx")
    pairs = {"layer3": "/layer3/layer3.1/relu_1/Relu_output_0", "layer4": "/layer4/layer4.1/relu_1/Relu_output_0"}
    torch_run = netdissection.dissect("resnet18", weights=str(weights), dataset=concept_set, layers=list(pairs),
                                      batch_size=8, workers=0)
    onnx_run = netdissection.dissect(str(onnx_file), dataset=concept_set, layers=list(pairs.values()),
                                     batch_size=8, workers=0)
    assert torch_run.provenance["backend"] == "torchvision" and onnx_run.provenance["backend"] == "onnx"
    for torch_layer, onnx_layer in pairs.items():
        assert_same_dissection(torch_run.layers[torch_layer], onnx_run.layers[onnx_layer])


def test_timm_vit_and_onnx_agree(tmp_path: Path, concept_set: Path) -> None:
    """A token model: both backends must drop the class token and lay out the patches the same way."""
    import timm
    torch.manual_seed(7)
    vit = timm.create_model("vit_small_patch16_224", img_size=64).eval()
    weights = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), weights)
    onnx_file = export_onnx(vit, tmp_path / "vit.onnx", dynamic_size=False)
    timm_run = netdissection.dissect("vit_small_patch16_224", backend="timm", weights=str(weights),
                                     dataset=concept_set, layers=["stage:-1"], batch_size=8, workers=0,
                                     backend_options={"input_size": (64, 64)})
    last_block = "/blocks/blocks.11/Add_1_output_0"
    # An ONNX file does not record its preprocessing: give it timm's (mean = std = 0.5 for this ViT).
    onnx_run = netdissection.dissect(str(onnx_file), dataset=concept_set, layers=[last_block], batch_size=8,
                                     workers=0, backend_options={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert timm_run.provenance["backend_details"]["stages"]["stage:11"] == "blocks.11"
    assert timm_run.provenance["input"]["mean"] == onnx_run.provenance["input"]["mean"]
    assert_same_dissection(timm_run.layers["stage:-1"], onnx_run.layers[last_block])
