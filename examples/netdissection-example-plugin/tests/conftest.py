"""The example plugin's tests use only netdissection's testing kit, enabled by this one line, and two files
made here: the kit's tiny model as a TorchScript file, and its tiny concept set as an npz file."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["netdissection.testing"]

INSTALL = "pip install -e examples/netdissection-example-plugin (from the netdissection checkout)"
INSTALLED = importlib.util.find_spec("netdissection_example") is not None
if not INSTALLED:
    if os.environ.get("CI"):  # in CI a missing plugin is a failure, never a quiet skip
        raise RuntimeError(f"the example plugin is not installed, so its tests cannot run; {INSTALL}")
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header() -> list[str]:
    return [] if INSTALLED else [f"the example plugin's tests are skipped: it is not installed; {INSTALL}"]


def _save_torchscript(model: object, path: Path) -> Path:
    import torch

    with warnings.catch_warnings():  # TorchScript is deprecated upstream; saving still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path


@pytest.fixture(scope="session")
def save_torchscript() -> Callable[[object, Path], Path]:
    """``save_torchscript(module, path)``: script a ``torch.nn.Module`` and save it."""
    return _save_torchscript


@pytest.fixture(scope="session")
def torchscript_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The testing kit's tiny model, scripted (its layers: conv1, relu1, conv2, relu2, pool, flatten, fc)."""
    from netdissection.testing import tiny_model

    return _save_torchscript(tiny_model(), tmp_path_factory.mktemp("model") / "tiny.ts")


@pytest.fixture(scope="session")
def npz_file(tmp_path_factory: pytest.TempPathFactory, tiny_broden_set: Path) -> Path:
    """The testing kit's tiny concept set (12 images, six categories) as one npz file."""
    from netdissection_example.npz_dataset import write_npz

    import netdissection

    dataset = netdissection.open_dataset(tiny_broden_set, format="broden",
                                         host=netdissection.build_host(entry_points=False))
    return write_npz(dataset, tmp_path_factory.mktemp("npz") / "tiny.npz")
