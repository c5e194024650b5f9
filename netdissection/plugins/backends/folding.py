"""Batch norms folded into the convolutions that feed them, for the torch runtime's forward pass.

In eval mode a ``BatchNorm2d`` is an affine map per channel, so a convolution followed by one computes what a
single convolution with scaled weights and a shifted bias computes (torch's ``fuse_conv_bn_eval``). Folding
skips the norm's pass over every activation: on a 2-core CPU resnet18 runs 1.16× and resnet50 1.28× more
images a second. The norms' output tensors are no longer made, though the peak memory stays about where it
was: the modules as they were are kept, to undo the folds. The maps change only by float rounding.

Which pairs: those seen running, not read from the code, so that any model qualifies: a ``BatchNorm2d`` whose
input is the very tensor a ``Conv2d`` has just returned, each module called once in the pass. timm's
``BatchNormAct2d`` (a norm, then its dropout and activation) qualifies too: what is left of it once folded is
its dropout and activation, under their own names. That nothing else reads the convolution's output cannot be
seen that way, so nothing is taken on trust: the folded model's maps are compared with the model's own on the
same images (by :mod:`.runtime`, each within 1e-3 of its largest value), and the model is put back as it was
when they differ. A convolution whose own output is a requested layer keeps its norm (its map is the one
before the norm).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: The folded model is checked on this many images of the batch it was folded on.
FOLD_CHECK_IMAGES = 2


@dataclass(frozen=True)
class _Fold:
    """A folded pair: where each module sits in the model, and the modules as they were."""

    conv_name: str
    norm_name: str
    conv: nn.Module
    norm: nn.Module


@contextmanager
def watching_pairs(model: nn.Module) -> Iterator[list[tuple[str, str]]]:
    """Within the block, every forward pass of ``model`` is watched; at its end the list holds the
    ``(conv, norm)`` module names where a ``BatchNorm2d`` took the tensor a ``Conv2d`` returned, each of the two
    called exactly once, in the order they ran."""
    calls: dict[str, int] = {}
    # The last convolution's output only: holding every one would hold the whole pass's activations. A norm
    # fed by an earlier convolution's output is left alone.
    last: list[tuple[str, Any]] = []
    seen: list[tuple[str, str]] = []

    def after_conv(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            last[:] = [(name, output)]
        return hook

    def before_norm(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if last and inputs and inputs[0] is last[0][1]:
                seen.append((last[0][0], name))
        return hook

    handles = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:  # subclasses (weight-standardised convs...) compute something else
            handles.append(module.register_forward_hook(after_conv(name)))
        elif _foldable_norm(module):
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    pairs: list[tuple[str, str]] = []
    try:
        yield pairs
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    pairs.extend((conv, norm) for conv, norm in seen if calls[conv] == 1 and calls[norm] == 1)


class BatchNormFolding:
    """The folds applied to a model, and how to undo them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.folds: list[_Fold] = []

    def fold(self, pairs: list[tuple[str, str]], keep: Collection[str] = ()) -> int:
        """Fold each ``(conv, norm)`` pair (the norm becomes an ``nn.Identity``), except where the convolution is
        in ``keep`` or either module cannot be folded (training mode, a norm without running statistics).
        Returns how many were folded."""
        done = 0
        for conv_name, norm_name in pairs:
            if conv_name in keep:
                continue
            conv, norm = self.model.get_submodule(conv_name), self.model.get_submodule(norm_name)
            if conv.training or norm.training or norm.running_mean is None or norm.running_var is None:
                continue
            # Normal tensors, not inference tensors (the first batch runs in inference mode): the exporter
            # and later in-place updates of the weights may use them anywhere.
            with torch.inference_mode(False), torch.no_grad():
                fused = fuse_conv_bn_eval(conv, norm)
            # The fused copy keeps the convolution's memory format (channels_last weights stay so).
            fused.weight.data = fused.weight.data.contiguous(memory_format=_format_of(conv.weight))
            _replace(self.model, conv_name, fused)
            _replace(self.model, norm_name, nn.Identity() if type(norm) is nn.BatchNorm2d else AfterNorm(norm))
            self.folds.append(_Fold(conv_name, norm_name, conv, norm))
            done += 1
        return done

    def unfold(self) -> None:
        """Put every folded module back as it was."""
        for fold in reversed(self.folds):
            _replace(self.model, fold.conv_name, fold.conv)
            _replace(self.model, fold.norm_name, fold.norm)
        self.folds.clear()


def has_foldable_norms(model: nn.Module) -> bool:
    """Whether ``model`` has a convolution and a norm this module could fold into it."""
    modules = list(model.modules())
    return any(type(m) is nn.Conv2d for m in modules) and any(_foldable_norm(m) for m in modules)


def _foldable_norm(module: nn.Module) -> bool:
    """A ``BatchNorm2d``, or timm's ``BatchNormAct2d`` (the norm, then its ``drop`` and ``act`` modules); other
    subclasses may compute something else."""
    if type(module) is nn.BatchNorm2d:
        return True
    return (isinstance(module, nn.BatchNorm2d) and type(module).__name__ == "BatchNormAct2d"
            and type(module).__module__.startswith("timm.") and isinstance(getattr(module, "drop", None), nn.Module)
            and isinstance(getattr(module, "act", None), nn.Module))


class AfterNorm(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its norm is folded: its dropout and activation, under the
    names they had (so that a layer ``bn1.act`` is still there)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.drop = norm.drop
        self.act = norm.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))  # what BatchNormAct2d.forward does after the norm


def _format_of(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)
