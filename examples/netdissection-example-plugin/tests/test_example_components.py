"""Each component of the example plugin, checked with netdissection.testing's contract checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from netdissection_example import plugin
from netdissection_example.fixed_threshold import FixedThreshold
from netdissection_example.markdown_report import MarkdownReport
from netdissection_example.npz_dataset import NpzDataset
from netdissection_example.torchscript import TorchScriptBackend

from netdissection import BackendOptions
from netdissection.testing import (
    check_backend,
    check_dataset,
    check_report_writer,
    check_threshold_rule,
)


def test_the_plugin_registers_all_five_components(plugin_host) -> None:  # type: ignore[no-untyped-def]
    host = plugin_host(plugin)
    record = next(p for p in host.plugins if p.name == plugin.__name__)
    assert record.error is None
    assert record.provides == ["backend:torchscript", "dataset:npz", "threshold:fixed", "reporter:markdown"]


def test_torchscript_backend(tiny_model, torchscript_file: Path, plugin_host) -> None:  # type: ignore[no-untyped-def]
    backend = TorchScriptBackend(torchscript_file, BackendOptions(input_size=(32, 32)))
    maps = check_backend(backend)
    assert [i.name for i in backend.layers()] == ["conv1", "relu1", "conv2", "relu2", "pool", "flatten", "fc"]
    # The same maps as the eager model through the built-in torchvision backend.
    eager = plugin_host().component("backend", "torchvision").factory(tiny_model, BackendOptions(input_size=(32, 32)))
    import torch

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = eager.activations(images, ["conv2", "relu1"])
    got = backend.activations(images, ["conv2", "relu1"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert tuple(maps["conv2"].shape) == (2, 16, 8, 8)


def test_npz_dataset(npz_file: Path) -> None:
    samples = check_dataset(NpzDataset(npz_file), reopen=NpzDataset)
    assert len(samples) == 12
    check_dataset(NpzDataset(npz_file, categories=["object", "color"]), reopen=NpzDataset)


def test_fixed_threshold_rule() -> None:
    thresholds = check_threshold_rule(FixedThreshold, {"value": 0.25})
    np.testing.assert_array_equal(thresholds, np.full(5, 0.25))
    with pytest.raises(ValueError, match="finite"):
        FixedThreshold(3, 10, value=float("nan"))


def test_markdown_report_writer(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (path,) = check_report_writer(MarkdownReport(), tiny_run, tmp_path)
    text = path.read_text()
    assert text.startswith("# Network dissection of Sequential") and "## conv2" in text
    assert text.count("\n| ") == 1 + 10  # the header and the top 10 units of 16


def test_a_scripted_model_that_is_not_a_chain_offers_its_output(save_torchscript, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x)

    backend = TorchScriptBackend(save_torchscript(Residual(), tmp_path / "res.ts"), BackendOptions(input_size=(16, 16)))
    assert [(i.name, i.shape) for i in backend.layers()] == [("output", (3, 16, 16))]
    check_backend(backend)
