"""What every torch-based backend shares: safe checkpoint loading, layer probing, hooked forward passes."""

from __future__ import annotations

import hashlib
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import DissectionError, UnknownNameError
from ...core.limits import check_inflation
from ...core.types import LayerInfo
from .layouts import VECTOR_LAYOUT, Layout, detect, token_hints


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refusal(exc: BaseException) -> str:
    """Why torch.load refused a checkpoint, in one line (its own message is many, and advises loading the
    file with code execution allowed)."""
    text = str(exc)
    if "Weights only load failed" in text:
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if named:
            return (f"it holds Python objects ({named.group(1).rstrip('.')}) that only running code from the file "
                    "could rebuild; checkpoints are read as data and never run (torch.load with weights_only=True): "
                    "save the weights alone with torch.save(model.state_dict(), PATH)")
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        return (f"it is no checkpoint torch reads as data (torch.load with weights_only=True): "
                f"{found.group(1).strip() if found else 'it is damaged'}")
    return f"it cannot be read as a torch checkpoint: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file, loaded as untrusted data (``weights_only=True``).

    Accepts a bare state dict or the usual wrappers (``state_dict``, ``model``, ``model_state``),
    and strips the ``module.`` prefix DataParallel adds. A checkpoint in torch's zip format is held to the
    inflation limit first: torch reads deflated members too, so a few MB could otherwise inflate to
    gigabytes in memory.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DissectionError(f"weights file {p} does not exist")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as archive:
                check_inflation(archive, p, f"weights file {p}")
        except DissectionError:
            raise
        except Exception as exc:  # zipfile raises many types on a damaged directory (UnicodeDecodeError, ...)
            # torch reads zips with another parser: what this one cannot check is refused, not passed on.
            raise DissectionError(f"weights file {p} is a damaged zip archive ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from None
    try:
        with warnings.catch_warnings():  # about odd pickle protocols and the like: the refusal says enough
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DissectionError(f"weights file {p} is refused: {_refusal(exc)}") from None
    for key in ("state_dict", "model", "model_state", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise DissectionError(f"weights file {p} holds no state dict of tensors (names → tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, path: str | Path, model_name: str) -> None:
    """Load a checkpoint strictly, with an error that says how far it is from fitting."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and (tuple(state[k].shape) != tuple(expected[k].shape)
                                                         or state[k].is_complex() != expected[k].is_complex())]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape or kind (e.g. {mismatched[0]})")
        raise DissectionError(f"checkpoint {path} does not fit {model_name}: keys {', '.join(parts)}; "
                              "is it a checkpoint of this architecture?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_state_dict(state, strict=True)
    except Exception as exc:  # the right names and shapes, values torch cannot copy in (complex, sparse, ...)
        raise DissectionError(f"checkpoint {path} does not fit {model_name}: {_first_line(exc)}") from None


def _layer_info(name: str, output: Any, batch: int, input_hw: tuple[int, int], prefix: int | None,
                patch: tuple[int, int] | None) -> tuple[LayerInfo, Layout] | None:
    """A module output's layer info (shape after conversion to a map) and layout; None for non-tensors.

    An output whose first dimension is not the batch (Swin's window-batched attention) is no per-image map.
    """
    if not isinstance(output, torch.Tensor) or output.ndim < 1:
        return None
    shape = tuple(output.shape[1:])
    layout = detect(shape, input_hw, prefix=prefix, patch=patch) if output.shape[0] == batch else VECTOR_LAYOUT
    return LayerInfo(name, layout.kind, layout.map_shape(shape, input_hw)), layout


class HookedModel:
    """A torch module whose named submodules' outputs can be captured in one forward pass.

    The forward pass stops as soon as the last call of every requested module has happened, so an
    early layer does not pay for the rest of the network. Token and channels-last outputs come out as
    ``(N, C, h, w)`` maps (see ``layouts``); their layout is decided on the probe pass.
    """

    def __init__(self, model: nn.Module, probe_input: torch.Tensor) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.modules.pop("", None)
        self.calls: dict[str, int] = {}
        self.infos: list[LayerInfo] = []
        self.layouts: dict[str, Layout] = {}
        self._probe(probe_input)

    def _probe(self, x: torch.Tensor) -> None:
        order: list[str] = []
        outputs: dict[str, Any] = {}

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(_m: nn.Module, _i: Any, out: Any) -> None:
                self.calls[name] = self.calls.get(name, 0) + 1
                if name in outputs:
                    order.remove(name)
                order.append(name)  # completion order; a reused module counts where it was last called
                outputs[name] = out
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            with torch.inference_mode():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        prefix, patch = token_hints(self.model)
        input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        for name in order:
            found = _layer_info(name, outputs[name], int(x.shape[0]), input_hw, prefix, patch)
            if found is not None:
                self.infos.append(found[0])
                self.layouts[name] = found[1]

    def layer_names(self) -> list[str]:
        return [i.name for i in self.infos]

    def check(self, layers: Sequence[str], model_name: str) -> None:
        known = self.layer_names()
        for layer in layers:
            if layer not in known:
                raise UnknownNameError(f"layer of {model_name}", layer, known,
                                       hint=f"list them with: dissect layers {model_name}")

    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        remaining = {name: self.calls.get(name, 1) for name in layers}

        class _Done(Exception):
            pass

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(_m: nn.Module, _i: Any, out: Any) -> None:
                captured[name] = out
                remaining[name] -= 1
                if all(v <= 0 for v in remaining.values()):
                    raise _Done
            return record

        handles = [self.modules[name].register_forward_hook(hook(name)) for name in set(layers)]
        try:
            self.model(x)
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        return {name: self._as_map(name, captured[name], input_hw) for name in layers}

    def _as_map(self, name: str, output: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        layout = self.layouts.get(name)
        if layout is None or not layout.spatial:
            return output  # the scheduler says a non-spatial output is no map
        return layout.to_map(output, input_hw)


#: Random weights are drawn from this seed, so that dissecting the same model name twice without
#: weights gives the same numbers (the caller's own random state is left as it was).
INIT_SEED = 0


@contextmanager
def seeded_init(seed: int = INIT_SEED) -> Iterator[None]:
    """Build a model with reproducible random weights without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
