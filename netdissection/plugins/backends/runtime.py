"""How a torch backend runs its forward pass (``--runtime``): the model's own eager torch code, or the same
computation exported to ONNX in memory and run by onnxruntime, or whichever of the two is faster here.

The exported graph is not the model's classifier: it is the backend's own ``forward(images, layers)`` —
hooks, ``forward_intermediates``, token grids restored — traced once for the requested layers, so it
returns exactly the maps the torch path returns, and stops where the torch path stops.

Nothing is taken on trust. The first batch of every input shape runs through both runtimes and the maps
are compared (each within ``CHECK_TOLERANCE`` of its largest value: float rounding passes, a graph that
traced a batch size or a Python branch as a constant does not). ``auto`` times that same batch in each
runtime (the better of two runs: a first run pays for its set-up) and keeps onnxruntime only when it is
clearly faster (``AUTO_MARGIN``); a model that does not export, or a graph that disagrees, stays on torch
with a line in the log. ``onnxruntime`` asked for by name fails in one line instead.

On torch, the batch norms that follow convolutions are folded into them on the first batch (:mod:`.folding`),
and the folded model's maps of two of its images are checked against the model's own, within the same
``CHECK_TOLERANCE``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError, MissingExtraError, first_line
from ...core.runtimes import RUNTIMES

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: How far an exported graph's map (or a folded model's) may be from torch's: this fraction of the map's largest
#: magnitude. Rounding stays far below it (about 2e-6 for folded ResNets and EfficientNets; deep networks whose
#: activations grow large amplify it); a traced constant, or a norm folded into a convolution whose output is
#: also read elsewhere, changes the maps by their own size.
CHECK_TOLERANCE = 1e-3
#: ``auto`` takes onnxruntime when its batch takes at most this fraction of torch's: it holds a second copy
#: of the weights, and a tie is no reason to leave the model's own code.
AUTO_MARGIN = 0.9
#: ONNX opset of the export (onnxruntime 1.16+ runs it; opset 17 has LayerNormalization).
OPSET = 17

#: ``forward(images, layers) -> {layer: (N, C, h, w) map}``: the backend's forward pass, traceable.
Forward = Callable[["torch.Tensor", tuple[str, ...]], "dict[str, torch.Tensor]"]


def check_runtime(runtime: str | None) -> None:
    """One line for a runtime no torch backend knows (the CLI offers only known ones; Python may pass any)."""
    if runtime is not None and runtime not in RUNTIMES:
        raise DissectionError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def _layer_maps(model: nn.Module, forward: Forward, layers: tuple[str, ...]) -> nn.Module:
    """The backend's forward for fixed layers as a module torch can export (the maps as a tuple)."""
    from torch import nn

    class LayerMaps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # registered, so that its weights are the graph's initializers

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            maps = forward(x, layers)
            return tuple(maps[layer] for layer in layers)

    # In the model's own mode: the exporter restores the wrapper's mode afterwards, recursively, and a fresh
    # module is in training mode (batch statistics in every BatchNorm from then on).
    return LayerMaps().train(model.training)


@dataclass
class _Graph:
    """One exported graph and its session; ``batch`` is None when it takes any batch size."""

    session: Any
    batch: int | None
    checked: set[tuple[int, ...]] = field(default_factory=set)


class RuntimeForward:
    """A torch backend's forward pass on the runtime the user asked for (see the module's docstring)."""

    def __init__(self, model: nn.Module, forward: Forward, runtime: str | None, *, device: Any,
                 model_name: str) -> None:
        from .folding import BatchNormFolding

        check_runtime(runtime)
        self.model = model
        self.forward = forward
        self.requested = runtime or "torch"
        # Folding serves the torch runtime only (onnxruntime fuses its graph itself).
        self._folding = BatchNormFolding(model) if self.requested != "onnxruntime" else None
        self._folded_for: tuple[str, ...] | None = None  # the layers the folds were checked for
        self.device = device
        self.model_name = model_name
        #: the runtime in use: decided on the first batch under ``auto``
        self.chosen: str | None = None if self.requested == "auto" else self.requested
        self.measured: dict[str, float] = {}  # seconds a batch, per runtime, when ``auto`` timed them
        self.decided_by: str | None = None  # where ``auto`` was decided, when not here (see ``adopt``)
        self._graphs: dict[tuple[str, ...], _Graph] = {}
        #: At most this many images at once on onnxruntime (set by a backend that takes whole batches; the
        #: torch forward it was given chunks them itself).
        self.chunk: int | None = None
        if self.requested == "onnxruntime":
            self._providers()  # a missing extra or CUDA provider is an error before any pass
        elif self.requested == "auto":
            try:
                self._providers()
            except DissectionError as exc:  # MissingExtraError too: auto then has one runtime to choose
                log.info("%s: --runtime auto runs the forward pass on torch (%s)", model_name, exc)
                self.chosen = "torch"

    def adopt(self, decided: Mapping[str, Any], by: str) -> None:
        """Under ``auto``: run on what another process decided (``decided``: the ``runtime`` and
        ``runtime_seconds_per_batch`` of its ``describe()``) instead of timing a batch here. A sharded run
        decides once, so that every shard's maps have the same float rounding; ``by`` says where (recorded).
        Another runtime than ``auto`` was asked for: nothing to adopt."""
        if self.requested != "auto":
            return
        chosen = decided.get("runtime")
        if chosen not in ("torch", "onnxruntime"):
            raise DissectionError(f"--runtime auto was decided as {chosen!r} by {by}, which no torch backend runs")
        if chosen == "onnxruntime":
            try:
                self._providers()
            except DissectionError as exc:
                raise DissectionError(f"--runtime auto chose onnxruntime on {by}, but it cannot run here ({exc}); "
                                      "install the same extras everywhere, or pass --runtime torch") from None
        self.chosen, self.decided_by = chosen, by
        self.measured = {str(k): float(v) for k, v in (decided.get("runtime_seconds_per_batch") or {}).items()}
        if chosen == "torch":
            self._graphs.clear()

    # ---- what the run records

    def release(self) -> None:
        """Put the model's folded norms back (the modules as they were): for a caller who keeps the model. A later
        forward pass folds them again."""
        if self._folding is not None:
            self._folding.unfold()
        self._folded_for = None

    def describe(self) -> dict[str, Any]:
        details: dict[str, Any] = {"runtime": self.chosen or self.requested}
        if self.requested != "torch":
            details["runtime_requested"] = self.requested
        if self.measured:
            details["runtime_seconds_per_batch"] = {k: round(v, 4) for k, v in self.measured.items()}
        if self.decided_by is not None:
            details["runtime_decided_by"] = self.decided_by
        if (self.chosen or self.requested) == "onnxruntime":
            import onnxruntime

            details["onnxruntime"] = onnxruntime.__version__
        elif self._folding is not None and self._folded_for is not None:
            details["batchnorms_folded"] = len(self._folding.folds)
        return details

    # ---- the forward pass

    def __call__(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        from ...core.chunks import gathered

        names = tuple(dict.fromkeys(layers))
        if self.chunk is not None and len(images) > self.chunk and self.chosen != "torch":
            # onnxruntime, or auto still deciding: a chunk at a time (torch's forward chunks a batch itself)
            return gathered((self._one(part, names) for part in images.split(self.chunk)), len(images))
        return self._one(images, names)

    def _one(self, images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if self.chosen == "torch":
            return self._torch(images, names)
        graph = self._graph(names, images)
        if graph is None:  # auto, and the model does not export
            return self._torch(images, names)
        shape = tuple(int(s) for s in images.shape)
        if shape in graph.checked:
            return self._run(graph, images, names)
        return self._checked(graph, images, names, shape)

    def _checked(self, graph: _Graph, images: torch.Tensor, names: tuple[str, ...],
                 shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The first batch of a shape: both runtimes, compared; under ``auto``, timed and decided."""
        started = time.perf_counter()
        reference = self._torch(images, names)
        torch_seconds = time.perf_counter() - started
        try:
            started = time.perf_counter()
            maps = self._run(graph, images, names)
            ort_seconds = time.perf_counter() - started
            mismatch = maps_mismatch(maps, reference)
        except DissectionError as exc:
            mismatch = str(exc)
        if mismatch and graph.batch is None:  # a graph traced with the batch size as a constant: one per size
            log.debug("%s: the exported graph does not take batches of %d (%s); exporting one that does",
                      self.model_name, shape[0], mismatch)
            fixed = self._export(names, images, batch=shape[0])
            if fixed is not None:
                self._graphs[(*names, f"batch={shape[0]}")] = fixed
                return self._checked(fixed, images, names, shape)
        if mismatch:
            if self.requested == "onnxruntime":
                raise DissectionError(f"{self.model_name} exported to ONNX does not compute what it computes in torch "
                                      f"({mismatch}); use --runtime torch")
            log.info("%s: onnxruntime's maps differ from torch's (%s); the forward pass stays on torch",
                     self.model_name, mismatch)
            self.chosen = "torch"
            return reference
        graph.checked.add(shape)
        if self.chosen is None:  # auto: each runtime's best of two runs (a first run pays for its set-up)
            started = time.perf_counter()
            maps = self._run(graph, images, names)
            ort_seconds = min(ort_seconds, time.perf_counter() - started)
            if ort_seconds <= AUTO_MARGIN * torch_seconds:  # torch's first run may have looked slow: run it again
                started = time.perf_counter()
                self._torch(images, names)
                torch_seconds = min(torch_seconds, time.perf_counter() - started)
            self.measured = {"torch": torch_seconds, "onnxruntime": ort_seconds}
            self.chosen = "onnxruntime" if ort_seconds <= AUTO_MARGIN * torch_seconds else "torch"
            log.info("%s: a batch of %d takes %.2f s in torch and %.2f s in onnxruntime here; the forward pass "
                     "runs on %s", self.model_name, shape[0], torch_seconds, ort_seconds, self.chosen)
            if self.chosen == "torch":
                self._graphs.clear()  # its weights' copy is no longer needed
                return reference
        return maps

    def _torch(self, images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        import torch

        with torch.inference_mode():
            if self._folding is not None and self._folded_for != names:
                return self._fold(images, names)
            return self.forward(images, names)

    def _fold(self, images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The first batch for these layers. A few of its images run through the model as it is, which shows
        which norms follow which convolutions; those are folded (but for requested layers), the whole batch
        runs through the folded model, and its maps of those few images are checked against the model's own.
        Every batch, the first too, is then the folded model's."""
        from .folding import FOLD_CHECK_IMAGES, has_foldable_norms, watching_pairs

        assert self._folding is not None
        self._folding.unfold()  # other layers than before: the convolutions requested now keep their norms
        self._folded_for = names
        if not has_foldable_norms(self.model):
            return self.forward(images, names)
        few = images[:FOLD_CHECK_IMAGES]
        with watching_pairs(self.model) as pairs:
            reference = self.forward(few, names)
        if not self._folding.fold(pairs, keep=names):
            return self.forward(images, names)
        maps = self.forward(images, names)
        mismatch = maps_mismatch({k: v[:len(few)] for k, v in maps.items()}, reference)
        if not mismatch:
            log.debug("%s: %d batch norms folded into their convolutions", self.model_name,
                      len(self._folding.folds))
            return maps
        self._folding.unfold()
        log.info("%s: folding its batch norms into their convolutions changes its maps (%s); they stay "
                 "unfolded", self.model_name, mismatch)
        return self.forward(images, names)

    def _run(self, graph: _Graph, images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The graph's maps of ``images`` (a fixed-batch graph is only ever run on batches of its size)."""
        import numpy as np
        import torch

        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        try:
            outputs = graph.session.run(None, {"images": x})
        except Exception as exc:  # onnxruntime raises its own types, one per kind of failure
            raise DissectionError(f"onnxruntime failed on a batch of shape {tuple(x.shape)}: "
                                  f"{first_line(exc)}") from None
        return {name: torch.from_numpy(value).to(images.device) for name, value in zip(names, outputs, strict=True)}

    # ---- the export

    def _graph(self, names: tuple[str, ...], images: torch.Tensor) -> _Graph | None:
        fixed = self._graphs.get((*names, f"batch={int(images.shape[0])}"))
        if fixed is not None:
            return fixed
        graph = self._graphs.get(names)
        if graph is None:
            graph = self._export(names, images, batch=None)
            if graph is None:
                return None
            self._graphs[names] = graph
        return graph

    def _export(self, names: tuple[str, ...], images: torch.Tensor, *, batch: int | None) -> _Graph | None:
        """The layers' maps as an ONNX graph in memory, in an onnxruntime session; None under ``auto`` when
        the model does not export (an error when onnxruntime was asked for)."""
        import torch

        started = time.perf_counter()
        buffer = io.BytesIO()
        outputs = [f"map{i}" for i in range(len(names))]
        dynamic = None if batch else {name: {0: "batch"} for name in ["images", *outputs]}
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _stdout_silenced():
                # The exporter warns about its own deprecation and each traced constant, and prints its graph
                # when it fails; the check says whether the graph is right, the error says why it failed.
                warnings.simplefilter("ignore")
                # Traced on noise, not on the batch it is checked on: a value the trace kept as a constant (a
                # Python branch on the data, a NumPy detour) then shows in the check instead of matching it.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    example = torch.randn(batch or 2, *images.shape[1:]).to(images.device)
                torch.onnx.export(_layer_maps(self.model, self.forward, names), (example,), buffer,
                                  dynamo=False, opset_version=OPSET, input_names=["images"], output_names=outputs,
                                  dynamic_axes=dynamic, do_constant_folding=True)
            session = self._session(buffer.getvalue())
        except (DissectionError, MissingExtraError):
            raise
        except Exception as exc:  # the exporter's and onnxruntime's failures are of many types
            if self.requested == "onnxruntime":
                raise DissectionError(f"{self.model_name} cannot run on onnxruntime: exporting it to ONNX failed "
                                      f"({first_line(exc)}); use --runtime torch") from None
            log.info("%s does not export to ONNX (%s); the forward pass stays on torch", self.model_name,
                     first_line(exc))
            self.chosen = "torch"
            return None
        log.debug("%s: layers %s exported to ONNX in %.2f s (%.1f MB)", self.model_name, ", ".join(names),
                  time.perf_counter() - started, len(buffer.getvalue()) / 1e6)
        return _Graph(session=session, batch=batch)

    def _providers(self) -> list[str]:
        try:
            import onnxruntime
        except ImportError:
            raise MissingExtraError("--runtime onnxruntime", "onnxruntime", "onnx") from None
        available = onnxruntime.get_available_providers()
        if getattr(self.device, "type", str(self.device)) == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise DissectionError("--runtime onnxruntime on a CUDA device needs onnxruntime-gpu (this "
                                      "onnxruntime has no CUDAExecutionProvider); install it, or use --runtime "
                                      "torch")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, model_bytes: bytes) -> Any:
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its warnings about unused initializers and the like are not the user's
        # As many threads as torch's, and none spinning between runs: while onnxruntime waits for the next
        # batch, the thresholds, the cache writes and the loader's workers need those cores (spinning threads
        # made the rest of a run 2-6× slower on 2 cores).
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(model_bytes, options, providers=self._providers())


@contextmanager
def _stdout_silenced() -> Iterator[None]:
    """The process's standard output (file descriptor 1) goes nowhere for a while: torch's exporter writes its
    log there from C++ (it turns its own log on whatever it is asked), and the terminal is the user's."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def maps_mismatch(maps: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    """Why two runs' maps are not the same maps up to float rounding ("" when they are): each within
    ``CHECK_TOLERANCE`` of its largest magnitude."""
    for name, expected in reference.items():
        got = maps[name]
        if tuple(got.shape) != tuple(expected.shape):
            return f"layer {name}: shape {tuple(got.shape)}, not {tuple(expected.shape)}"
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        difference = float((got.float() - expected.float()).abs().max()) if expected.numel() else 0.0
        if not difference <= CHECK_TOLERANCE * max(scale, 1e-12):
            return f"layer {name}: values differ by up to {difference:.3g} where they reach {scale:.3g}"
    return ""
