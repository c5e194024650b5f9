"""The ONNX backend: any ``.onnx`` file, run by onnxruntime (``dissect model.onnx``; no ``--backend`` needed).

Layers are the graph's value names (``/layer4/layer4.1/relu_1/Relu_output_0`` for a torch export), listed
with the shapes ``onnx.shape_inference.infer_shapes`` gives for the probe input size; the few it cannot
resolve are measured by one probe run. onnxruntime returns only graph outputs, so before the session is
created the requested tensors become the graph's outputs (the original outputs are dropped: nothing
else is needed). One ``InferenceSession.run`` per batch serves every requested layer.

Input: one image tensor, NCHW (or NHWC, recognised by a trailing dimension of 3). A dynamic batch
dimension takes the whole batch at once; a fixed one gets the batch split into chunks of that size,
the last padded with zeros (whose outputs are dropped). When the graph fixes H and W and the images are
another size, each batch is resized bilinearly to the model's size (``layouts.fit_input``): the maps are
upsampled to the label resolution afterwards anyway, so only the layer's grid changes. ``--input-size``
is the probe size for graphs whose H, W are dynamic (default 224); ``--mean/--std/--bgr`` set the
preprocessing, ImageNet's RGB statistics by default (an ONNX file does not record them).

Execution provider: CUDA when onnxruntime has it, else CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError, MissingExtraError, UnknownNameError, first_line
from ...core.hookspecs import hookimpl
from ...core.types import BackendOptions, InputSpec, LayerInfo

if TYPE_CHECKING:  # onnx, onnxruntime and torch are imported when a backend is made
    import numpy as np
    import torch

    from .layouts import Layout

log = logging.getLogger(__name__)

DEFAULT_SIZE = (224, 224)
SUFFIX = ".onnx"
_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
_INPUT_TYPES = (1, 10, 11)  # what numpy can feed: FLOAT, FLOAT16, DOUBLE
#: The most values one batch handed to the graph may hold: 512 images of 3 × 224 × 224.
MAX_INPUT_VALUES = 512 * 3 * 224 * 224


def _import() -> tuple[Any, Any]:
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("the onnx backend", "onnx", "onnx") from None
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("the onnx backend", "onnxruntime", "onnx") from None
    return onnx, onnxruntime


def _dims(value_type: Any) -> list[int | None] | None:
    """A tensor type's dimensions (None where symbolic or unknown), or None when its rank is unknown."""
    tensor = value_type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


def _check_names(proto: Any, path: Path) -> None:
    """Refuse a graph whose value names are not UTF-8 text, as ONNX requires (protobuf hands such names over as
    bytes, which nothing downstream takes)."""
    graph = proto.graph
    names = [n for node in graph.node for n in (*node.input, *node.output)]
    names += [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    bad = next((n for n in names if not isinstance(n, str)), None)
    if bad is not None:
        raise DissectionError(f"{path} is not a valid ONNX model: the value name {bad!r} is not UTF-8 text")


def _copy(message: Any) -> Any:
    """A copy of a protobuf message. Not through bytes: parsing validates UTF-8, and a stranger's graph may
    hold names that are not (onnxruntime then refuses the graph, in one line)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def providers(device: str, available: Sequence[str]) -> list[Any]:
    """CUDA (on the device ``cuda:N`` names, else 0) when onnxruntime has it, then CPU."""
    if "CUDAExecutionProvider" in available:
        index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackend:
    """An ONNX graph run by onnxruntime."""

    name = "onnx"
    runtimes = ("onnxruntime", "auto")  # --runtime: a graph runs on onnxruntime, whatever is asked

    def __init__(self, model_ref: str | os.PathLike[str], options: BackendOptions) -> None:
        onnx, ort = _import()
        from .torch_common import file_sha256

        self.options = options
        self.path = Path(os.fspath(model_ref)).expanduser()
        if not self.path.is_file():
            raise DissectionError(f"model file {self.path} does not exist")
        try:
            proto = onnx.load(str(self.path))
        except Exception as exc:  # protobuf DecodeError, a missing external-data file, ...
            raise DissectionError(f"{self.path} is not an ONNX model ({first_line(exc)}); export one with "
                                  "torch.onnx.export or check the file") from None
        if proto.ir_version <= 0 or not proto.graph.node:
            raise DissectionError(f"{self.path} is not an ONNX model (no graph in it); export one with "
                                  "torch.onnx.export or check the file")
        _check_names(proto, self.path)
        self.proto = proto
        self.sha256 = file_sha256(self.path)
        self._onnx, self._ort = onnx, ort
        self._providers = providers(options.device, ort.get_available_providers())
        self._read_input()
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._elem_types: dict[str, int] = {}
        self.infos, self.layouts = self._probe_layers()

    # ---- the graph -----------------------------------------------------------------------------------------

    def _read_input(self) -> None:
        graph = self.proto.graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise DissectionError(f"{self.path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                                  "the onnx backend needs a model with one image input")
        self.input = inputs[0]
        dims = _dims(self.input.type)
        if dims is None or len(dims) != 4:
            raise DissectionError(f"{self.path}: input {self.input.name!r} has shape {dims}; an image model "
                                  "takes (N, 3, H, W) or (N, H, W, 3)")
        self.nhwc = dims[3] == 3 and dims[1] != 3
        self.input_dims = dims
        self.fixed_batch = dims[0]
        hw = (dims[1], dims[2]) if self.nhwc else (dims[2], dims[3])
        self.fixed_size: tuple[int, int] | None = (hw[0], hw[1]) if hw[0] and hw[1] else None
        requested = tuple(self.options.input_size) if self.options.input_size else None
        if self.fixed_size and requested and requested != self.fixed_size:
            log.warning("%s takes only %d×%d inputs: --input-size %d×%d is ignored, images are resized to it",
                        self.path.name, *self.fixed_size, *requested)
        self.spatial_input: tuple[int, int] = self.fixed_size or requested or DEFAULT_SIZE  # type: ignore[assignment]
        elem_type = self.input.type.tensor_type.elem_type
        if elem_type not in _INPUT_TYPES:
            name = self._onnx.TensorProto.DataType.Name(elem_type) if elem_type in \
                self._onnx.TensorProto.DataType.values() else str(elem_type)
            raise DissectionError(f"{self.path}: input {self.input.name!r} takes {name} values; an image model "
                                  "takes floats (FLOAT, FLOAT16 or DOUBLE)")
        self.input_dtype = self._onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        self._check_input_size()

    def _check_input_size(self) -> None:
        """Refuse a graph whose fixed input dimensions no run can feed: every batch is resized (and padded) to
        them, so a graph fixing gigapixel images or a batch of 100,000 would allocate that much at once."""
        from ...core.limits import MAX_IMAGE_PIXELS, megapixels

        h, w = self.spatial_input
        batch = self.fixed_batch or 1
        channels = self.input_dims[3] if self.nhwc else self.input_dims[1]
        if h * w > MAX_IMAGE_PIXELS or batch * h * w * 3 > MAX_INPUT_VALUES or (channels or 3) > 4:
            fixed = bool(self.fixed_size or self.fixed_batch or (channels or 3) > 4)
            fed = f"has the fixed shape {self.input_dims}" if fixed else f"would take --input-size {h},{w}"
            fix = "export it with dynamic or smaller dimensions" if fixed else "pass a smaller --input-size"
            raise DissectionError(
                f"{self.path}: input {self.input.name!r} {fed} (images of {megapixels(h * w)} in batches of "
                f"{batch}), more than a run can feed: at most {megapixels(MAX_IMAGE_PIXELS)} an image and "
                f"{MAX_INPUT_VALUES:,} values a batch; {fix}")

    def _probe_shape(self) -> list[int]:
        h, w = self.spatial_input
        batch = self.fixed_batch or 1
        return [batch, h, w, 3] if self.nhwc else [batch, 3, h, w]

    def _inferred_types(self) -> dict[str, Any]:
        """Every value's type for the probe input size: shape inference on the graph with a concrete input."""
        dims = self.input.type.tensor_type.shape.dim
        saved = [_copy(d) for d in dims]
        try:
            for d, value in zip(dims, self._probe_shape(), strict=True):
                d.dim_value = value
            inferred = self._onnx.shape_inference.infer_shapes(self.proto, data_prop=True)
        except Exception as exc:  # inference is a convenience: fall back to the probe run for everything
            log.debug("shape inference failed on %s: %s", self.path.name, first_line(exc))
            inferred = None
        finally:
            for d, original in zip(dims, saved, strict=True):
                d.CopyFrom(original)
        if inferred is None:
            return {}
        graph = inferred.graph
        return {v.name: v.type for v in (*graph.value_info, *graph.output)}

    def _probe_layers(self) -> tuple[list[LayerInfo], dict[str, Layout]]:
        from .layouts import VECTOR_LAYOUT, detect

        types = self._inferred_types()
        names: list[str] = []
        shapes: dict[str, tuple[int, ...] | None] = {}
        depends = {self.input.name}  # values computed from the image (not weights passed through Identity)
        for node in self.proto.graph.node:
            if not any(i in depends for i in node.input):
                continue
            depends.update(node.output)
            for name in node.output:
                if not name or name in shapes:
                    continue
                value_type = types.get(name)
                if value_type is not None and value_type.tensor_type.elem_type not in _FLOAT_TYPES:
                    continue  # shape arithmetic, indices, masks: never a map
                dims = _dims(value_type) if value_type is not None else None
                if value_type is not None:
                    self._elem_types[name] = value_type.tensor_type.elem_type
                names.append(name)
                shapes[name] = tuple(dims) if dims is not None and all(d is not None for d in dims) else None
        unknown = [n for n in names if shapes[n] is None]
        if unknown:
            shapes.update(self._measure(unknown))
        batch = self._probe_shape()[0]
        infos, layouts = [], {}
        for name in names:
            shape = shapes.get(name)
            if not shape:
                continue  # neither inference nor the probe run produced it (or not a float tensor)
            per_image = tuple(shape[1:])
            layout = detect(per_image, self.spatial_input) if shape[0] == batch else VECTOR_LAYOUT
            infos.append(LayerInfo(name, layout.kind, layout.map_shape(per_image, self.spatial_input)))
            layouts[name] = layout
        return infos, layouts

    def _measure(self, names: list[str]) -> dict[str, tuple[int, ...] | None]:
        """Shapes that inference left open, from one probe run that returns those tensors."""
        import numpy as np

        log.debug("%s: measuring %d shapes shape inference left open", self.path.name, len(names))
        try:
            session = self._make_session(names)
            outputs = session.run(names, {self.input.name: np.zeros(self._probe_shape(), dtype=self.input_dtype)})
        except Exception as exc:
            log.debug("probe run of %s failed: %s", self.path.name, first_line(exc))
            return {}
        found: dict[str, tuple[int, ...] | None] = {}
        for name, value in zip(names, outputs, strict=True):
            ok = isinstance(value, np.ndarray) and value.dtype.kind == "f"
            found[name] = tuple(value.shape) if ok else None
            if ok:
                self._elem_types[name] = self._onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return found

    def _make_session(self, outputs: Sequence[str]) -> Any:
        """A session whose graph outputs are exactly ``outputs`` (onnxruntime returns nothing else)."""
        onnx, ort = self._onnx, self._ort
        graph = self.proto.graph
        saved = [_copy(o) for o in graph.output]
        del graph.output[:]
        for name in outputs:  # the element type only: a shape could disagree with another input size
            elem_type = self._elem_types.get(name, onnx.TensorProto.FLOAT)
            graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        try:
            blob = self.proto.SerializeToString()
        finally:
            del graph.output[:]
            graph.output.extend(saved)
        settings = ort.SessionOptions()
        settings.log_severity_level = 3  # errors only: dropping the original outputs leaves unused nodes
        printed = io.StringIO()
        try:
            # onnxruntime prints a banner to stdout when a provider fails and it retries another; the failure,
            # if it is one, comes as the exception.
            with contextlib.redirect_stdout(printed):
                return ort.InferenceSession(blob, sess_options=settings, providers=self._providers)
        except Exception as exc:
            raise DissectionError(f"onnxruntime cannot load {self.path}: {first_line(exc)}") from None
        finally:
            if printed.getvalue().strip():
                log.debug("onnxruntime said: %s", printed.getvalue().strip())

    def session(self, layers: Sequence[str]) -> Any:
        """The session that returns ``layers`` (created once per set of layers)."""
        key = tuple(dict.fromkeys(layers))
        if key not in self._sessions:
            self._sessions[key] = self._make_session(key)
        return self._sessions[key]

    # ---- the Backend protocol ------------------------------------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        return list(self.infos)

    def input_spec(self) -> InputSpec:
        default = InputSpec()
        return InputSpec(size=self.spatial_input, mean=self.options.mean or default.mean,
                         std=self.options.std or default.std, channel_order="BGR" if self.options.bgr else "RGB")

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        from .layouts import fit_input

        for layer in layers:
            if layer not in self.layouts:
                raise UnknownNameError(f"tensor of {self.path.name}", layer, list(self.layouts),
                                       hint=f"list them with: dissect layers {self.path}")
        names = tuple(dict.fromkeys(layers))
        session = self.session(names)
        x = fit_input(images, self.fixed_size)
        input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self.input_dtype)
        chunks = self._chunks(array)
        results: list[list[np.ndarray]] = []
        for chunk, keep in chunks:
            try:
                outputs = session.run(list(names), {self.input.name: chunk})
            except Exception as exc:
                raise DissectionError(f"onnxruntime failed to run {self.path.name} on a batch of shape "
                                      f"{tuple(chunk.shape)}: {first_line(exc)}") from None
            results.append([o[:keep] for o in outputs])
        maps: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            parts = [r[i] for r in results]
            value = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
            layout = self.layouts[name]
            if layout.spatial:
                value = self._as_map(name, layout, value, input_hw)
            maps[name] = value.to(images.device)
        return {layer: maps[layer] for layer in layers}

    def _as_map(self, name: str, layout: Layout, value: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """A tensor as the ``(N, C, h, w)`` map its layout says; a graph whose shape information disagrees with
        what it computes (a stranger's file may say anything) is refused in one line."""
        try:
            result = layout.to_map(value, input_hw)
        except (ValueError, RuntimeError):
            result = None
        if result is None or result.ndim != 4:
            raise DissectionError(f"{self.path.name}: tensor {name!r} is {tuple(value.shape)} when the model runs, "
                                  f"not the {layout.kind} map its graph declared; the graph's shape information "
                                  "is wrong: export the model again")
        return result

    def _chunks(self, array: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """The batch as the graph takes it: whole for a dynamic batch dimension, else chunks of the fixed
        size, the last padded with zeros; each with the number of real images in it."""
        import numpy as np

        batch = self.fixed_batch
        if batch is None or array.shape[0] == batch:
            return [(array, array.shape[0])]
        chunks = []
        for start in range(0, array.shape[0], batch):
            part = array[start:start + batch]
            keep = part.shape[0]
            if keep < batch:
                part = np.concatenate([part, np.zeros((batch - keep, *part.shape[1:]), dtype=part.dtype)])
            chunks.append((part, keep))
        return chunks

    def describe(self) -> dict[str, Any]:
        proto = self.proto
        return {
            "backend": self.name,
            "model": str(self.path),
            "sha256": self.sha256,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "opset": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import},
            "onnx": self._onnx.__version__,
            "onnxruntime": self._ort.__version__,
            "runtime": "onnxruntime",
            "providers": [p[0] if isinstance(p, tuple) else p for p in self._providers],
            "input": {"name": self.input.name, "shape": self.input_dims, "layout": "NHWC" if self.nhwc else "NCHW"},
            "batch": self.fixed_batch or "dynamic",
            "resized_to": list(self.fixed_size) if self.fixed_size else None,
        }


@hookimpl
def dissect_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register("onnx", OnnxBackend, description="ONNX files, run by onnxruntime",
             accepts="a .onnx file; layers are tensor names (see: dissect layers MODEL.onnx)",
             requires=("onnx", "onnxruntime"))


@hookimpl
def dissect_detect_backend(model_ref: Any) -> str | None:
    if isinstance(model_ref, str | os.PathLike) and os.fspath(model_ref).lower().endswith(SUFFIX):
        return "onnx"
    return None
