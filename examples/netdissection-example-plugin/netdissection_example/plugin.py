"""The hook implementations: what this plugin gives the host. Each import of a component is inside its hook,
so that loading the plugin costs nothing until a component is used."""

from __future__ import annotations

from typing import Any

import netdissection


@netdissection.hookimpl
def dissect_register_backends(register: Any) -> None:
    from .torchscript import TorchScriptBackend

    register("torchscript", TorchScriptBackend, description="TorchScript files (torch.jit.save)",
             accepts="a .ts or .torchscript file; layers: the children of a chained (Sequential-like) model, "
                     "nested with dots, else the model's output",
             requires=("torch",))


@netdissection.hookimpl
def dissect_detect_backend(model_ref: Any) -> str | None:
    from .torchscript import is_torchscript

    return "torchscript" if is_torchscript(model_ref) else None


@netdissection.hookimpl
def dissect_register_datasets(register: Any) -> None:
    from .npz_dataset import NpzDataset, is_npz, write_npz

    register("npz", NpzDataset, description="a concept set in one .npz file (images, label layers, concepts)",
             detect=is_npz, writer=write_npz)


@netdissection.hookimpl
def dissect_register_thresholds(register: Any) -> None:
    from .fixed_threshold import FixedThreshold

    register("fixed", FixedThreshold, description="one absolute threshold for every unit "
             "(--threshold-param value=V)")


@netdissection.hookimpl
def dissect_register_reporters(register: Any) -> None:
    from .markdown_report import MarkdownReport

    register("markdown", MarkdownReport, description="report.md: per layer, the detectors and the top units")


@netdissection.hookimpl
def dissect_register_commands(cli: Any, context: Any) -> None:
    from .commands import npz_info_command

    cli.add_command(npz_info_command(context))
