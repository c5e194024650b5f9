"""What every torch-based backend shares: safe checkpoint loading, layer probing, hooked forward passes."""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ...core.chunks import gathered
from ...core.errors import DissectionError, first_line
from ...core.limits import check_inflation
from ...core.types import LayerInfo
from .late_layers import CHAIN_CHECK_IMAGES, Chain, Probe, find_chain, within
from .layouts import ATTENTION_LAYOUT, VECTOR_LAYOUT, Layout, attention_probabilities, detect, token_hints
from .runtime import maps_mismatch

log = logging.getLogger(__name__)


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
    return f"it cannot be read as a torch checkpoint: {first_line(exc)}"


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
                                  f"{first_line(exc)})") from None
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
    _check_fits(state, model.state_dict(), path, model_name)
    _load_state(model, state, path, model_name)


M = TypeVar("M")


def build_with_weights(make: Callable[[], M], module_of: Callable[[M], nn.Module], path: str | Path,
                       model_name: str) -> M:
    """``make()``'s model (``module_of`` finds the module in what it returns) holding the checkpoint's weights.

    The model is built on the meta device, without drawing random values for every weight only to overwrite
    them (1.5 s for timm's vit_small_patch16_224 here, 0.1 s for a ResNet-18), and the checkpoint's tensors, cast
    to the model's dtypes, become its weights. A model that cannot be built there (one that reads a tensor's
    value while it is built), or that keeps state no checkpoint holds (a buffer it does not save), is built as
    usual, seeded, and the weights copied in: the same model either way."""
    state = read_state_dict(path)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = make()
    except Exception:  # any failure here only means: build it the usual way
        built = None
    if built is not None:
        module = module_of(built)
        expected = module.state_dict()
        _check_fits(state, expected, path, model_name)
        plain = all(v.layout == torch.strided and v.is_floating_point() == expected[k].is_floating_point()
                    for k, v in state.items())  # else the copy below converts, or refuses, as it always did
        if plain and _all_saved(module, expected):
            cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
            _load_state(module, cast, path, model_name, assign=True)
            return built
    with seeded_init():
        built = make()
    module = module_of(built)
    _check_fits(state, module.state_dict(), path, model_name)
    _load_state(module, state, path, model_name)
    return built


def _all_saved(module: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor of the module built on the meta device is one its checkpoint holds (no buffer
    left out of its state dict, no tensor kept as a plain attribute)."""
    if any(name not in saved for name, _ in (*module.named_parameters(), *module.named_buffers())):
        return False
    return not any(isinstance(value, torch.Tensor) for m in module.modules() for value in vars(m).values())


def _check_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str | Path,
                model_name: str) -> None:
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


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_name: str, *,
                assign: bool = False) -> None:
    """``load_state_dict`` of a state that fits (:func:`_check_fits`); what torch still refuses, in one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_state_dict(state, strict=True, assign=assign)
    except Exception as exc:  # the right names and shapes, values torch cannot copy in (complex, sparse, ...)
        raise DissectionError(f"checkpoint {path} does not fit {model_name}: {first_line(exc)}") from None


#: ``layout_of(name, output, batch, input_hw)``: a module's probe output as a layer (its info and layout),
#: or None when the output is no tensor.
LayoutOf = Callable[[str, Any, int, tuple[int, int]], "tuple[LayerInfo, Layout] | None"]

ATTENTION_NOTE = ("attention probabilities (heads × queries × keys, each row summing to 1), not a map of units "
                  "over image positions")


def layer_info(name: str, output: Any, batch: int, input_hw: tuple[int, int],
               tokens: Callable[[tuple[int, ...]], tuple[Layout, str]]) -> tuple[LayerInfo, Layout] | None:
    """A module output's layer info (shape after conversion to a map) and layout; None for non-tensors.

    An output whose first dimension is not the batch (Swin's window-batched attention) is no per-image map;
    a softmax over the last axis of a rank-4 output is attention probabilities. ``tokens`` decides the
    layout of a rank-2 per-image shape ``(T, C)`` and says why it is none.
    """
    if not isinstance(output, torch.Tensor) or output.ndim < 1:
        return None
    shape = tuple(output.shape[1:])
    note = ""
    if output.shape[0] != batch:
        layout = VECTOR_LAYOUT
    elif attention_probabilities(output):
        layout, note = ATTENTION_LAYOUT, ATTENTION_NOTE
    elif len(shape) == 2:
        layout, note = tokens(shape)
    else:
        layout = detect(shape, input_hw)
    return LayerInfo(name, layout.kind, layout.map_shape(shape, input_hw), note=note), layout


def inferred_layout_of(model: nn.Module) -> LayoutOf:
    """Layouts for any torch module: token grids inferred from the shape, with what the model says about
    its prefix tokens and patch size (see ``layouts.infer_tokens``)."""
    prefix, patch = token_hints(model)

    def layout_of(name: str, output: Any, batch: int, input_hw: tuple[int, int]) -> tuple[LayerInfo, Layout] | None:
        def tokens(shape: tuple[int, ...]) -> tuple[Layout, str]:
            return detect(shape, input_hw, prefix=prefix, patch=patch), ""

        return layer_info(name, output, batch, input_hw, tokens)

    return layout_of


class _Done(Exception):
    """Raised by a capturing hook once every requested module has run: the rest of the forward is skipped."""


class HookedModel:
    """A torch module whose named submodules' outputs can be captured in one forward pass.

    The plain forward pass stops as soon as the last call of every requested module has happened, so an
    early layer does not pay for the rest of the network. Token and channels-last outputs come out as
    ``(N, C, h, w)`` maps (see ``layouts``); their layout is decided on the probe pass, by ``layout_of``.
    ``on_output(name, output)`` sees every module output of the probe the moment it is made (before any
    later in-place operation can change it).
    """

    def __init__(self, model: nn.Module, probe_input: torch.Tensor, *, model_name: str = "the model",
                 layout_of: LayoutOf | None = None, on_output: Callable[[str, Any], None] | None = None) -> None:
        self.model = model
        self.model_name = model_name
        self.modules = dict(model.named_modules())
        self.modules.pop("", None)
        self.calls: dict[str, int] = {}
        self.infos: list[LayerInfo] = []
        self.layouts: dict[str, Layout] = {}
        #: modules whose output the model changes in place after it is made (``out += identity``, an in-place
        #: ReLU): a captured output of theirs is copied the moment it is made.
        self.changed_later: set[str] = set()
        #: what the probe saw of every module (order, calls, sizes), for :mod:`.late_layers`
        self.probe = Probe(calls=self.calls)
        #: set by :meth:`run_in_chunks`: the batch the forward pass is given, and the images it runs at once
        self.batch: int | None = None
        self.chunk: int | None = None
        self._chains: dict[tuple[str, ...], Chain | None] = {}
        self._probe(probe_input, layout_of or inferred_layout_of(model), on_output)

    def _probe(self, x: torch.Tensor, layout_of: LayoutOf, on_output: Callable[[str, Any], None] | None) -> None:
        order = self.probe.order
        outputs: dict[str, Any] = {}
        versions: dict[str, int] = {}  # a tensor's version counter as its module returned it
        per_image = max(1, int(x.shape[0]))

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(_m: nn.Module, inputs: Any, out: Any) -> None:
                self.calls[name] = self.calls.get(name, 0) + 1
                if name in outputs:
                    order.remove(name)
                order.append(name)  # completion order; a reused module counts where it was last called
                outputs[name] = out
                if isinstance(out, torch.Tensor):
                    versions[name] = out._version
                    if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
                        self.probe.sizes[name] = (inputs[0].numel() // per_image, out.numel() // per_image)
                if on_output is not None:
                    on_output(name, out)
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            # no_grad, not inference_mode: only normal tensors count their in-place changes (_version).
            with torch.no_grad():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        self.changed_later = {name for name, version in versions.items() if outputs[name]._version != version}
        input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        for name in order:
            found = layout_of(name, outputs[name], int(x.shape[0]), input_hw)
            if found is not None:
                self.infos.append(found[0])
                self.layouts[name] = found[1]

    def layer_names(self) -> list[str]:
        return [i.name for i in self.infos]

    def capture(self, run: Callable[[], Any], layers: Sequence[str], *, stop_when_done: bool) -> tuple[
            dict[str, torch.Tensor], Any]:
        """Run ``run()`` with the outputs of the ``layers`` modules captured (the last call of each); with
        ``stop_when_done``, stop the forward once every one has had all its calls. Returns the raw outputs and
        what ``run`` returned (None when stopped)."""
        captured: dict[str, torch.Tensor] = {}
        remaining = {name: self.calls.get(name, 1) for name in layers}

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(_m: nn.Module, _i: Any, out: Any) -> None:
                captured[name] = out.clone() if name in self.changed_later else out
                remaining[name] -= 1
                if stop_when_done and all(v <= 0 for v in remaining.values()):
                    raise _Done
            return record

        # Looked up now, not from the probe's table: the runtime may have swapped modules since (a batch
        # norm folded into its convolution is an nn.Identity under the norm's name).
        handles = [self.model.get_submodule(name).register_forward_hook(hook(name)) for name in set(layers)]
        result = None
        try:
            result = run()
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [name for name in layers if name not in captured]
        if missing:
            raise DissectionError(f"layer {missing[0]!r} of {self.model_name} did not run in this forward pass; "
                                  "dissect it in a run of its own")
        return captured, result

    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own forward, stopped once every requested layer has run; one map per layer. A batch
        larger than the chunk (:meth:`run_in_chunks`) runs a chunk at a time, its late layers at once where
        that is the same computation (:mod:`.late_layers`)."""
        if self.chunk is None or len(x) <= self.chunk:
            return self._plain(x, layers)
        chain = self._chain(x, tuple(layers))
        return self._in_chunks(x, layers) if chain is None else self._chained(x, layers, chain)

    def run_in_chunks(self, batch: int, chunk: int) -> None:
        """From now on take batches of up to ``batch`` images, holding the tensors of ``chunk`` at a time in the
        early layers (see :mod:`.late_layers`)."""
        self.batch, self.chunk = batch, chunk
        self._chains.clear()

    @property
    def whole_batches_from(self) -> dict[str, str]:
        """Per requested layers (joined by commas), the module from whose input the batch ran whole."""
        return {",".join(layers): chain.start for layers, chain in self._chains.items() if chain is not None}

    def _plain(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        captured, _ = self.capture(lambda: self.model(x), layers, stop_when_done=True)
        return self.maps(captured, (int(x.shape[-2]), int(x.shape[-1])))

    def _in_chunks(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        assert self.chunk is not None
        return gathered((self._plain(part, layers) for part in x.split(self.chunk)), len(x))

    def _chained(self, x: torch.Tensor, layers: Sequence[str], chain: Chain) -> dict[str, torch.Tensor]:
        """The chunks up to the chain's start (and the requested layers before it), then the chain at once."""
        assert self.chunk is not None
        input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        before = [layer for layer in layers if not any(within(layer, m) for m in chain.modules)]
        inputs: list[torch.Tensor] = []

        def head(part: torch.Tensor) -> dict[str, torch.Tensor]:
            def stop(_m: nn.Module, args: Any) -> None:
                inputs.append(args[0])
                raise _Done

            handle = self.model.get_submodule(chain.start).register_forward_pre_hook(stop)
            try:
                captured, _ = self.capture(lambda: self.model(part), before, stop_when_done=False)
            finally:
                handle.remove()
            return self.maps(captured, input_hw)

        parts = x.split(self.chunk)
        early = gathered((head(part) for part in parts), len(x))
        if len(inputs) != len(parts):  # a chunk ran the whole model without reaching the chain
            raise DissectionError(f"module {chain.start!r} of {self.model_name} did not run in this forward pass")
        start = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        inputs.clear()

        def run_chain() -> torch.Tensor:
            out = start
            for name in chain.modules:
                out = self.model.get_submodule(name)(out)
            return out

        late, _ = self.capture(run_chain, [layer for layer in layers if layer not in early], stop_when_done=True)
        late = self.maps(late, input_hw)
        return {layer: early[layer] if layer in early else late[layer] for layer in layers}

    def _chain(self, x: torch.Tensor, layers: tuple[str, ...]) -> Chain | None:
        """The chain these layers' batches run at once (found and checked on the first batch), or None."""
        if layers in self._chains:
            return self._chains[layers]
        assert self.chunk is not None and self.batch is not None
        chain = find_chain(self.probe, list(self.modules), layers, batch=self.batch, chunk=self.chunk)
        if chain is not None:
            few = x[:min(CHAIN_CHECK_IMAGES, self.chunk)]
            try:
                mismatch = maps_mismatch(self._chained(few, layers, chain), self._plain(few, layers))
            except Exception as exc:  # the chain does not even run as the model does: not the model's forward
                mismatch = first_line(exc)
            if mismatch:
                log.info("%s: its modules from %s on run one after the other in the probe, but not as its forward "
                         "runs them (%s); each batch runs %d images at a time", self.model_name, chain.start,
                         mismatch, self.chunk)
                chain = None
            else:
                log.debug("%s: %s; batches run %d images at a time up to %s, whole from there", self.model_name,
                          ", ".join(layers), self.chunk, chain.start)
        self._chains[layers] = chain
        return chain

    def maps(self, captured: dict[str, torch.Tensor], input_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Captured outputs as ``(N, C, h, w)`` maps (a non-spatial output is passed on as it is)."""
        return {name: self._as_map(name, output, input_hw) for name, output in captured.items()}

    def _as_map(self, name: str, output: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        layout = self.layouts.get(name)
        if layout is None or not layout.spatial:
            return output  # the scheduler says a non-spatial output is no map
        try:
            return layout.to_map(output, input_hw)
        except ValueError as exc:  # tokens that do not fit the grid of this batch's input size
            raise DissectionError(f"layer {name!r} of {self.model_name}: {exc}; pick another layer or a stage "
                                  "(stage:N)") from None


#: Random weights are drawn from this seed, so that dissecting the same model name twice without
#: weights gives the same numbers (the caller's own random state is left as it was).
INIT_SEED = 0


@contextmanager
def seeded_init(seed: int = INIT_SEED) -> Iterator[None]:
    """Build a model with reproducible random weights without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
