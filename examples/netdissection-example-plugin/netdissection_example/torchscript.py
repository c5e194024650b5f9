"""A backend for TorchScript files (``torch.jit.save``).

A loaded TorchScript module takes no forward hooks, so its layers are read from its graph instead: when the
model's ``forward`` only chains its children (``nn.Sequential``, scripted or traced), each child is a layer,
and so are the children of a child that is itself a chain (``layer1.0``). One forward pass runs the chain
child by child, keeping the outputs asked for and stopping after the deepest. Any other graph offers one
layer: its ``output``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netdissection import BackendOptions, DissectionError, InputSpec, LayerInfo
from netdissection.core.errors import UnknownNameError

if TYPE_CHECKING:  # torch is imported when a backend is made, not when plugins are listed
    import torch

SUFFIXES = (".ts", ".torchscript")
DEFAULT_SIZE = (224, 224)
OUTPUT = "output"

Chain = list[tuple[str, Any]]


def is_torchscript(model_ref: Any) -> bool:
    return isinstance(model_ref, str | os.PathLike) and os.fspath(model_ref).lower().endswith(SUFFIXES)


def chain_of(module: Any) -> Chain | None:
    """The children ``forward`` calls one after the other, each on the previous one's output; None when the
    graph does anything else."""
    try:
        graph = module.graph
    except (AttributeError, RuntimeError):
        return None
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        return None
    me, current = inputs[0].unique(), inputs[1].unique()
    attributes: dict[int, str] = {}
    steps: list[str] = []
    for node in graph.nodes():
        kind = node.kind()
        if kind == "prim::GetAttr" and node.inputsAt(0).unique() == me:
            attributes[node.output().unique()] = node.s("name")
        elif kind == "prim::CallMethod" and node.s("name") == "forward":
            args = list(node.inputs())
            if len(args) != 2 or args[0].unique() not in attributes or args[1].unique() != current:
                return None
            steps.append(attributes[args[0].unique()])
            current = node.output().unique()
        elif kind != "prim::Constant":
            return None
    returned = list(graph.return_node().inputs())
    if not steps or len(returned) != 1 or returned[0].unique() != current:
        return None
    return [(name, getattr(module, name)) for name in steps]


class TorchScriptBackend:
    """A TorchScript model file. ``--input-size``, ``--mean``, ``--std`` and ``--bgr`` apply; the weights are
    in the file, so ``--weights`` and ``--pretrained`` do not."""

    def __init__(self, model_ref: Any, options: BackendOptions) -> None:
        import torch

        if options.weights or options.pretrained:
            raise DissectionError("--weights and --pretrained do not apply to TorchScript files: the weights "
                                  "are in the file")
        self.path = Path(os.fspath(model_ref)).expanduser()
        if not self.path.is_file():
            raise DissectionError(f"TorchScript file {self.path} does not exist")
        self.options = options
        self.device = torch.device(options.device)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream; loading still works
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DissectionError(f"{self.path} is not a TorchScript file ({first})") from None
        self.size = options.input_size or DEFAULT_SIZE
        self.chains: dict[str, Chain] = {}
        root = chain_of(self.module)
        if root is not None:
            self._collect("", root)
        with torch.inference_mode():
            probe = self._run(torch.zeros(1, 3, *self.size, device=self.device), None)
        self.infos = [LayerInfo(name, "conv" if t.ndim == 4 else "vector", tuple(t.shape[1:]))
                      for name, t in probe.items()]

    def _collect(self, prefix: str, chain: Chain) -> None:
        self.chains[prefix] = chain
        for name, child in chain:
            inner = chain_of(child)
            if inner is not None:
                self._collect(f"{prefix}{name}.", inner)

    def _run(self, images: torch.Tensor, wanted: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """One forward pass; the outputs of ``wanted`` (None: every layer), stopping after the deepest."""
        out: dict[str, torch.Tensor] = {}
        if not self.chains:
            out[OUTPUT] = self.module(images)
            return out
        remaining = set(wanted) if wanted is not None else None

        def run(prefix: str, x: torch.Tensor) -> torch.Tensor:
            for name, child in self.chains[prefix]:
                full = prefix + name
                deeper = f"{full}." in self.chains and (remaining is None or any(
                    w.startswith(f"{full}.") for w in remaining))
                x = run(f"{full}.", x) if deeper else child(x)
                if remaining is None or full in remaining:
                    out[full] = x
                    if remaining is not None:
                        remaining.discard(full)
                if remaining is not None and not remaining:
                    break
            return x

        run("", images)
        return out

    def layers(self) -> list[LayerInfo]:
        return list(self.infos)

    def input_spec(self) -> InputSpec:
        default = InputSpec()
        return InputSpec(size=self.size, mean=self.options.mean or default.mean, std=self.options.std or default.std,
                         channel_order="BGR" if self.options.bgr else "RGB")

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        known = [i.name for i in self.infos]
        for name in layers:
            if name not in known:
                raise UnknownNameError(f"layer of {self.path.name}", name, known,
                                       hint=f"list them with: dissect layers {self.path}")
        with torch.inference_mode():
            out = self._run(images.to(self.device), list(layers))
        return {name: out[name].contiguous() for name in layers}

    def describe(self) -> dict[str, Any]:
        import torch

        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"backend": "torchscript", "model": self.path.stem, "path": str(self.path.resolve()),
                "weights_sha256": digest, "torch": torch.__version__}
