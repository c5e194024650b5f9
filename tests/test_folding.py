"""Batch norms folded into their convolutions on the torch runtime: the maps stay the model's own (up to float
rounding), a requested convolution keeps its norm, and a fold that would change what the model computes is
undone."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from torch import nn  # noqa: E402

from netdissection.core.types import BackendOptions  # noqa: E402
from netdissection.plugins.backends.folding import AfterNorm, BatchNormFolding, watching_pairs  # noqa: E402
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend  # noqa: E402


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm statistics and affine parameters far from the identity a fresh model has, so that a fold
    changes the weights for real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
    return model


def eager_maps(model: nn.Module, images: torch.Tensor, modules: list[str]) -> dict[str, torch.Tensor]:
    """The outputs of ``modules`` in a plain eager forward pass of ``model`` (hooks, nothing of ours), fed as the
    backend feeds it on CPU (channels last: the same kernels, so the same bits)."""
    images = images.contiguous(memory_format=torch.channels_last)
    captured: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, out.clone())) for name in modules]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def assert_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= tolerance * float(expected.abs().max())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def resnet(runtime: str | None = None) -> tuple[TorchvisionBackend, nn.Module]:
    backend = TorchvisionBackend("resnet18", BackendOptions(input_size=(64, 64), runtime=runtime))
    trained_like(backend.model)
    return backend, copy.deepcopy(backend.model)  # the model as it is, before any fold


def test_folded_maps_are_the_models_own(images: torch.Tensor) -> None:
    backend, reference = resnet()
    layers = ["layer4", "layer3", "layer2.1.bn2"]
    first = backend.activations(images, layers)  # the batch that folds: already the folded model's maps
    later = backend.activations(images, layers)
    expected = eager_maps(reference, images, layers)
    for layer in layers:
        assert torch.equal(first[layer], later[layer])  # every batch alike, whichever comes first
        assert_close(later[layer], expected[layer])
        assert not torch.equal(later[layer], expected[layer])  # folded for real
    # Every conv -> norm pair of resnet18 (stem, 16 in the blocks, 3 downsamples): each norm is now an identity.
    assert backend.describe()["batchnorms_folded"] == 20
    norms = [m for m in backend.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms == []
    assert isinstance(backend.model.get_submodule("layer2.1.bn2"), nn.Identity)


def test_a_requested_convolution_keeps_its_norm(images: torch.Tensor) -> None:
    backend, reference = resnet()
    layers = ["layer4", "layer1.0.conv1"]
    backend.activations(images, layers)
    maps = backend.activations(images, layers)
    expected = eager_maps(reference, images, layers)
    # Its map is the one before its norm (the stem before it is folded: equal up to rounding, not bit for bit).
    assert_close(maps["layer1.0.conv1"], expected["layer1.0.conv1"])
    assert_close(maps["layer4"], expected["layer4"])
    assert backend.describe()["batchnorms_folded"] == 19
    assert isinstance(backend.model.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)


def test_other_layers_later_unfold_what_they_need(images: torch.Tensor) -> None:
    backend, reference = resnet()
    backend.activations(images, ["layer4"])
    backend.activations(images, ["layer4"])  # everything folded, layer1.0.conv1 included
    assert isinstance(backend.model.get_submodule("layer1.0.bn1"), nn.Identity)
    maps = backend.activations(images, ["layer1.0.conv1"])  # before its norm again (the stem's is folded)
    assert_close(maps["layer1.0.conv1"], eager_maps(reference, images, ["layer1.0.conv1"])["layer1.0.conv1"])
    assert isinstance(backend.model.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)


class SharedConvOutput(nn.Module):
    """A convolution whose output a norm reads, and a residual reads too: folding the norm would change
    the residual. Watching the modules run cannot tell; the check must."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(self.norm(y) + y)


def test_a_fold_that_changes_the_maps_is_undone(images: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    model = trained_like(SharedConvOutput()).eval()
    reference = copy.deepcopy(model)
    backend = TorchvisionBackend(model, BackendOptions(input_size=(64, 64)))
    with caplog.at_level(logging.INFO, logger="netdissection"):
        backend.activations(images, ["head"])
    maps = backend.activations(images, ["head"])
    assert torch.equal(maps["head"], eager_maps(reference, images, ["head"])["head"])
    assert backend.describe()["batchnorms_folded"] == 0
    assert isinstance(backend.model.norm, nn.BatchNorm2d)
    assert "stay unfolded" in caplog.text


def test_pairs_are_those_that_ran_once() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.BatchNorm2d(4)).eval()
    with watching_pairs(model) as pairs, torch.inference_mode():
        model(torch.randn(1, 3, 16, 16))
    assert pairs == [("0", "1")]  # the second norm reads a ReLU's output, not a convolution's
    folding = BatchNormFolding(model)
    assert folding.fold(pairs) == 1 and isinstance(model[1], nn.Identity)
    folding.unfold()
    assert isinstance(model[1], nn.BatchNorm2d) and type(model[0]) is nn.Conv2d


def test_onnxruntime_folds_nothing(images: torch.Tensor) -> None:
    pytest.importorskip("onnxruntime")
    backend, _ = resnet("onnxruntime")
    backend.activations(images, ["layer4"])
    assert "batchnorms_folded" not in backend.describe()
    assert any(isinstance(m, nn.BatchNorm2d) for m in backend.model.modules())


def test_timm_norms_with_their_activation(images: torch.Tensor) -> None:
    timm = pytest.importorskip("timm")
    from netdissection.plugins.backends.timm_backend import TimmBackend

    backend = TimmBackend("efficientnet_b0", BackendOptions(input_size=(64, 64)))
    trained_like(backend.model)
    reference = copy.deepcopy(backend.model)
    layers = ["stage:-1", "bn1.act"]  # a stage, and the activation inside the stem's BatchNormAct2d
    backend.activations(images, layers)
    maps = backend.activations(images, layers)
    expected = eager_maps(reference, images, ["blocks.6", "bn1.act"])
    assert_close(maps["stage:-1"], expected["blocks.6"])
    assert_close(maps["bn1.act"], expected["bn1.act"])
    assert backend.describe()["batchnorms_folded"] > 40
    # Every norm up to the stage is folded (the head's never ran: the pass stops at the stage).
    assert isinstance(backend.model.bn1, AfterNorm)
    assert not any(isinstance(m, timm.layers.BatchNormAct2d) for m in backend.model.blocks.modules())
    assert isinstance(backend.model.bn2, timm.layers.BatchNormAct2d)


def test_an_output_changed_in_place_later_is_captured_as_made(images: torch.Tensor) -> None:
    """A ResNet block adds its shortcut to bn2's output in place and applies an in-place ReLU to bn1's: the maps
    of those layers are what the norms returned, bit for bit (folding left out, to compare exactly)."""
    backend, reference = resnet()
    backend.runtime._folding = None
    layers = ["layer2.1.bn2", "layer1.0.bn1", "layer3"]
    maps = backend.activations(images, layers)
    expected = eager_maps(reference, images, layers)
    for layer in layers:
        assert torch.equal(maps[layer], expected[layer]), layer
    assert float(maps["layer1.0.bn1"].min()) < 0  # not the ReLU's output


def test_a_callers_model_comes_back_as_it_was(tmp_path: Path) -> None:
    """The Python API with a model object: the run folds its norms and puts it in eval mode while it runs, then
    gives them back, so a model being trained is again in training (each module in its own mode), with its norm
    modules and its weights bit for bit."""
    import torchvision

    import netdissection

    from .random_broden import write_random_broden

    torch.manual_seed(0)
    model = trained_like(torchvision.models.resnet18()).train()
    model.layer1.eval()  # a module in a mode of its own
    norms = {name: module for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    before = copy.deepcopy(model.state_dict())
    data = write_random_broden(tmp_path / "broden", images=8, image_size=32, label_size=16, seed=3)
    result = netdissection.dissect(model, dataset=str(data), layers=["layer2"], out=tmp_path / "out", workers=0)
    assert result.layers["layer2"].units == 128
    assert model.training and not model.layer1.training and not model.layer1[0].bn1.training and model.layer2.training
    assert {name: module for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)} == norms
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_folds_overwrite_the_weights_in_place_and_undo_bit_for_bit(images: torch.Tensor) -> None:
    """No second copy of the weights: each folded convolution keeps its parameter objects and their memory, and
    the values it had come back from the temporary file exactly."""
    backend, _ = resnet()
    model = backend.model
    before = copy.deepcopy(model.state_dict())
    parameters = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    backend.activations(images, ["layer4"])
    assert backend.describe()["batchnorms_folded"] == 20
    for name, p in model.named_parameters():
        if name in parameters:  # the folded convolutions of resnet18 also gained a bias
            assert p is parameters[name][0] and p.data_ptr() == parameters[name][1], name
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])  # fused, in place
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    backend.release()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.conv1.bias is None


def test_tied_weights_are_not_folded() -> None:
    """Two convolutions holding one weight: folding a norm into one would change the other."""
    model = trained_like(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()
    model[3].weight = model[0].weight
    with watching_pairs(model) as pairs, torch.inference_mode():
        model(torch.randn(1, 4, 8, 8))
    assert pairs == [("0", "1"), ("3", "4")]
    assert BatchNormFolding(model).fold(pairs) == 0
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm2d)


def test_without_a_writable_temporary_folder_the_weights_wait_in_memory(
        images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    backend, reference = resnet()
    before = copy.deepcopy(backend.model.state_dict())
    with caplog.at_level(logging.DEBUG, logger="netdissection"):
        maps = backend.activations(images, ["layer4"])
    assert "batch-norm folding keeps the weights it replaces in memory" in caplog.text
    assert backend.describe()["batchnorms_folded"] == 20
    assert_close(maps["layer4"], eager_maps(reference, images, ["layer4"])["layer4"])
    backend.release()
    after = backend.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
