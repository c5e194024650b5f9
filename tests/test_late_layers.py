"""Early layers a chunk at a time, late layers the whole batch at once: the same maps as the model's own forward."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from netdissection.core.scheduler import Plan, run_passes
from netdissection.core.types import BackendOptions, InputSpec
from netdissection.plugins.backends.torch_common import HookedModel
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.thresholds.quantile import QuantileRule
from tests.random_broden import write_random_broden
from tests.test_shards import assert_same_results

BATCH, CHUNK = 16, 4


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def images(n: int = BATCH, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def model_calls(model: nn.Module) -> list[int]:
    """The batch sizes the model's (or module's) forward is called with, from now on."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    return sizes


@pytest.mark.parametrize("layers", [["layer4", "layer3"], ["layer1", "layer4"], ["layer3.1.conv2"]])
def test_late_layers_run_the_whole_batch_with_the_models_own_maps(layers: list[str]) -> None:
    model = resnet()
    plain = HookedModel(model, images(1))
    with torch.no_grad():
        expected = plain.forward(images(), layers)
    hooked = HookedModel(model, images(1))
    hooked.run_in_chunks(BATCH, CHUNK)
    whole, head = model_calls(model.layer3), model_calls(model)
    with torch.no_grad():
        got = hooked.forward(images(), layers)
    # At 64 px conv1's output is 64×32×32 an image; from layer3's input (128×8×8) on, 16 images hold at most
    # half of what 4 hold there.
    assert hooked.whole_batches_from == {",".join(layers): "layer3"}
    assert whole[-1] == BATCH and max(head) <= CHUNK  # the model itself never sees more than a chunk
    for layer in layers:
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-5, atol=1e-5)


class CodeBetween(nn.Module):
    """Siblings that run in order, but the forward changes a tensor between two of them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 8, 4, stride=4)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.down(self.stem(x))) * 2)


def test_a_chain_that_is_not_the_forward_is_checked_and_left(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = CodeBetween().eval()
    x = images(size=32)
    with torch.no_grad():
        expected = model(x)
        hooked = HookedModel(model, images(1, size=32), model_name="CodeBetween")
        hooked.run_in_chunks(BATCH, CHUNK)
        calls = model_calls(model)
        with caplog.at_level(logging.INFO):
            got = hooked.forward(x, ["c"])["c"]
    assert hooked.whole_batches_from == {}
    assert "CodeBetween: its modules from b on run one after the other in the probe, but not as its forward" in (
        caplog.text)
    assert max(calls) <= CHUNK
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_as_large_as_the_first_run_a_chunk_at_a_time() -> None:
    # No layer gets smaller: the whole batch would hold BATCH / CHUNK times a chunk's tensors everywhere.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    hooked = HookedModel(model, images(1, size=16))
    hooked.run_in_chunks(BATCH, CHUNK)
    calls = model_calls(model)
    with torch.no_grad():
        got = hooked.forward(images(size=16), ["3"])["3"]
        assert hooked.whole_batches_from == {} and calls == [CHUNK] * (BATCH // CHUNK)
        expected = model(images(size=16))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_broden(tmp_path_factory.mktemp("data") / "broden", images=40, image_size=64, label_size=16,
                               seed=3)


def plan_of(broden: Path, layers: list[str], *, takes_whole: bool) -> tuple[Plan, InputSpec]:
    """A dissection of resnet18 at 64 px, batches of 16 run 4 images at a time."""
    backend = TorchvisionBackend(resnet(), BackendOptions(input_size=(64, 64)))
    if not takes_whole:
        backend.take_whole_batches = lambda batch, chunk: False  # type: ignore[method-assign]
    plan = Plan(backend=backend, dataset=BrodenDataset(broden), layers=layers, batch_size=BATCH, forward_chunk=CHUNK,
                make_rule=lambda units, values: QuantileRule(units, values, q=0.15), workers=0, top_k=5)
    return plan, backend.input_spec()


def test_a_dissection_gives_the_same_results_with_the_late_layers_run_whole(broden: Path) -> None:
    """Through the scheduler: the torchvision backend takes whole batches (the model sees chunks up to layer3,
    whole batches from there) and the results are those of the scheduler's own chunks, byte for byte."""
    plan, spec = plan_of(broden, ["layer4", "layer3"], takes_whole=True)
    got, _, _ = run_passes(plan, spec)
    expected, _, _ = run_passes(*plan_of(broden, ["layer4", "layer3"], takes_whole=False))
    details = plan.backend.describe()
    assert details["whole_batches_from"] == {"layer4,layer3": "layer3"} and details["forward_chunk"] == CHUNK
    assert_same_results(got, expected)
