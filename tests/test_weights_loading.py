"""A model given a weights file is built around its tensors on the meta device (no random init to overwrite):
the same model, the same maps, as building it seeded and copying the weights in; and where the meta device
cannot build it whole, it is built the usual way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from netdissection.core.errors import DissectionError
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends.torch_common import build_with_weights, load_weights


def saved(model: nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    torch.manual_seed(1)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            values = torch.randn_like(tensor)
            tensor.copy_(values.abs() + 0.5 if key.endswith("running_var") else values)
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def copied(make: type[nn.Module], path: Path) -> nn.Module:
    """The plain way: built with its own init, the weights copied in."""
    model = make()
    load_weights(model, path, make.__name__)
    return model


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert not sa[key].is_meta, key
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class UnsavedBuffer(Net):
    """A buffer the model computes and does not save: on the meta device it would stay empty."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.arange(8.0).view(1, 8, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.offset


class PlainAttribute(Net):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.full((1, 8, 1, 1), 2.0)  # neither a parameter nor a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class ReadsValues(Net):
    """Reads a tensor's value while it is built (as drop-path schedules do): impossible on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.rates = [float(r) for r in torch.linspace(0, 0.1, 3)]


@pytest.mark.parametrize("make", [Net, UnsavedBuffer, PlainAttribute, ReadsValues])
def test_built_around_the_weights_is_the_copied_model(make: type[nn.Module], tmp_path: Path) -> None:
    path = saved(make(), tmp_path / "w.pth")
    built = build_with_weights(make, lambda m: m, path, make.__name__)
    plain = copied(make, path)
    assert_same(built, plain)
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        assert torch.equal(built.eval()(x), plain.eval()(x))


def test_a_half_precision_checkpoint_gives_the_models_own_dtype(tmp_path: Path) -> None:
    path = saved(Net(), tmp_path / "w.pth", torch.float16)
    built = build_with_weights(Net, lambda m: m, path, "net")
    assert built.conv.weight.dtype == torch.float32
    assert_same(built, copied(Net, path))


class Wider(Net):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)


def test_a_checkpoint_that_does_not_fit_says_how(tmp_path: Path) -> None:
    path = saved(Net(), tmp_path / "w.pth")
    with pytest.raises(DissectionError, match=r"checkpoint .*w\.pth does not fit wider: keys 2 missing \(e\.g\. "
                       r"extra\.weight\)"):
        build_with_weights(Wider, lambda m: m, path, "wider")


@pytest.mark.parametrize(("backend", "name"), [("torchvision", "resnet18"), ("timm", "test_vit")])
def test_a_backend_given_weights_computes_what_the_copied_model_does(backend: str, name: str,
                                                                    tmp_path: Path) -> None:
    """The backends build around the file; the maps equal those of the model built seeded and loaded."""
    if backend == "timm":
        import timm

        from netdissection.plugins.backends.timm_backend import TimmBackend as Backend

        def make() -> nn.Module:
            return timm.create_model(name, dynamic_img_size=True, dynamic_img_pad=True)
        layer = "blocks.0"
    else:
        import torchvision

        from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend as Backend

        def make() -> nn.Module:
            return torchvision.models.get_model(name)
        layer = "layer1"
    path = saved(make(), tmp_path / "w.pth")
    model = Backend(name, BackendOptions(weights=str(path)))
    plain = make()
    load_weights(plain, path, name)
    assert_same(model.model, plain.eval())
    images = torch.randn(2, 3, 64, 64)
    reference = Backend(name, BackendOptions())  # built seeded, as without a weights file ...
    reference.model.load_state_dict(plain.state_dict())  # ... and given the same numbers
    with torch.inference_mode():
        assert torch.equal(model.activations(images, [layer])[layer], reference.activations(images, [layer])[layer])
