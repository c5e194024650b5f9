"""Hostile model files: ONNX graphs (truncated, flipped bytes, any opset or IR version, odd inputs, unknown
operators, lying shapes, external data outside the folder, no spatial output) and checkpoints (truncated,
wrong keys, odd values, pickles that would run code, zip bombs).

The property: the backend or the checkpoint loads and the layers it lists run, or the file is refused with
one DissectionError line. A pickle that would run code is refused and the test proves the code did not run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from netdissection.core.errors import DissectionError
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends.onnx_backend import OnnxBackend
from netdissection.plugins.backends.torch_common import build_with_weights, load_weights, read_state_dict

from .hostile import cut, flip_bytes, fuzz, read_or_refuse

# -------------------------------------------------------------------------------------------------------- ONNX


def tiny_graph(*, input_dims: list[Any] | None = None, opset: int = 17, vector: bool = False,
               elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Two 3×3 convolutions with ReLUs on an (N, 3, H, W) image (or, ``vector``, a global pool and a matrix
    product: no spatial output at all); seeded weights."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    fc = numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "fc")
    if vector:
        nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
                 helper.make_node("Flatten", ["pooled"], ["flat"]),
                 helper.make_node("MatMul", ["flat", "fc"], ["out"])]
        initializers, output = [fc], helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])
    else:
        nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c1"], ["r1"]),
                 helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
                 helper.make_node("Relu", ["c2"], ["out"])]
        initializers, output = [w1, w2], helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, "h", "w"])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
        "image", elem_type, input_dims if input_dims is not None else ["N", 3, "H", "W"])], [output], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run_onnx(path: Path) -> None:
    """Open the model, list its layers, run the last spatial one on a batch; check what comes out."""
    backend = OnnxBackend(path, BackendOptions())
    spatial = [info for info in backend.layers() if info.spatial]
    if not spatial:
        return  # the run refuses it: "has no layer with a spatial map" (tested through the CLI)
    maps = backend.activations(torch.zeros(2, 3, 16, 16), [spatial[-1].name])[spatial[-1].name]
    assert maps.ndim == 4 and maps.shape[0] == 2, maps.shape


@st.composite
def hostile_onnx(draw: st.DrawFn) -> bytes:
    model = tiny_graph(vector=draw(st.sampled_from([False, False, False, True])))
    graph = model.graph
    kind = draw(st.sampled_from(["valid", "truncate", "flip", "opset", "ir", "input", "elem", "op", "dangling",
                                 "cycle", "value_info", "external", "outputs"]))
    if kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 5, 9, 11, 13, 21, 23, 99, 10_000]))
        if draw(st.booleans()):
            model.opset_import[0].domain = draw(st.sampled_from(["evil.domain", "ai.onnx.ml"]))
    elif kind == "ir":
        model.ir_version = draw(st.sampled_from([0, 1, 3, 7, 11, 99, 2**40]))
    elif kind == "input":
        dims = draw(st.lists(st.one_of(st.sampled_from([0, 1, 3, 16, 100_000, 2**31]), st.just("sym")),
                             min_size=0, max_size=6))
        del graph.input[0].type.tensor_type.shape.dim[:]
        for d in dims:
            dim = graph.input[0].type.tensor_type.shape.dim.add()
            if d == "sym":
                dim.dim_param = "d"
            else:
                dim.dim_value = d
    elif kind == "elem":
        graph.input[0].type.tensor_type.elem_type = draw(st.sampled_from(
            [TensorProto.INT64, TensorProto.STRING, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL, 0]))
    elif kind == "op":
        graph.node[draw(st.integers(0, len(graph.node) - 1))].op_type = draw(st.sampled_from(
            ["EvilOp", "Identity", "Softmax", "Reshape", ""]))
    elif kind == "dangling":
        del graph.initializer[:]
    elif kind == "cycle":
        graph.node[0].input[0] = graph.node[-1].output[0]
    elif kind == "value_info":  # shapes that disagree with what the graph computes
        dims = draw(st.sampled_from([[1, 4, 1000, 1000], [1, 4], [1, 50, 4], [2, 4, 3, 3], [1, 4, 1, 1, 1]]))
        graph.value_info.append(helper.make_tensor_value_info(graph.node[0].output[0], TensorProto.FLOAT, dims))
    elif kind == "external":  # an initializer whose data lies in another file, anywhere
        tensor = graph.initializer[0]
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", draw(st.sampled_from(["../../etc/passwd", "/etc/hostname", "nothing.bin",
                                                               "model.onnx"]))), ("length", "432")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    elif kind == "outputs":
        del graph.output[:]
    data = model.SerializeToString()
    if kind == "truncate":
        data = cut(draw, data)
    elif kind == "flip":
        data = flip_bytes(draw, data)
    return data


@fuzz(200)
@given(data=st.data())
def test_onnx_models_load_and_run_or_are_refused(tmp_path_factory: pytest.TempPathFactory,
                                                 data: st.DataObject) -> None:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(data.draw(hostile_onnx(), label="model"))
    read_or_refuse(lambda: run_onnx(path), seconds=60)


def test_a_model_without_a_spatial_output_lists_no_spatial_layer(tmp_path: Path) -> None:
    path = tmp_path / "vector.onnx"
    onnx.save(tiny_graph(vector=True), str(path))
    assert not [i for i in OnnxBackend(path, BackendOptions()).layers() if i.spatial]


@pytest.mark.parametrize("opset", [1, 99])
def test_an_opset_onnxruntime_lacks_is_one_line(tmp_path: Path, opset: int) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(tiny_graph(opset=opset), str(path))
    outcome = read_or_refuse(lambda: run_onnx(path))
    assert isinstance(outcome, DissectionError) and "model.onnx" in str(outcome)


@pytest.mark.parametrize("dims", [[1, 3, 100_000, 100_000], [100_000, 3, 224, 224]])
def test_a_fixed_input_too_large_to_feed_is_refused(tmp_path: Path, dims: list[int]) -> None:
    """A graph that fixes gigapixel inputs (or a batch of 100,000) would have every batch resized (or padded)
    to it: refused from its declared shape, before anything is allocated."""
    path = tmp_path / "model.onnx"
    onnx.save(tiny_graph(input_dims=dims), str(path))
    with pytest.raises(DissectionError, match=r"model\.onnx: input 'image' has the fixed shape"):
        OnnxBackend(path, BackendOptions())


def test_external_data_outside_the_models_folder_is_refused(tmp_path: Path) -> None:
    model = tiny_graph()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(np.zeros(108, dtype=np.float32).tobytes())
    (tmp_path / "models").mkdir()
    onnx.save(model, str(tmp_path / "models" / "model.onnx"))
    outcome = read_or_refuse(lambda: run_onnx(tmp_path / "models" / "model.onnx"))
    assert isinstance(outcome, DissectionError) and "model.onnx" in str(outcome)


# ------------------------------------------------------------------------------------------------ checkpoints


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)


class RunsCode:
    """Unpickling this runs ``code``: what a malicious checkpoint does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def _marker_code(marker: Path) -> str:
    return f"with open({str(marker)!r}, 'w') as f: f.write('the checkpoint ran code')"


@st.composite
def hostile_checkpoint(draw: st.DrawFn, marker: Path) -> tuple[Any, str]:
    """A checkpoint object and how to save it (torch's zip, torch's legacy format, plain pickle)."""
    state: dict[Any, Any] = {k: v.clone() for k, v in Tiny().state_dict().items()}
    kind = draw(st.sampled_from(["valid"] * 3 + ["keys", "values", "dtype", "shape", "wrap", "wrap", "evil",
                                                  "empty", "scalar"]))
    name = draw(st.sampled_from(sorted(state)))
    if kind == "keys":
        key = draw(st.one_of(st.text(max_size=10), st.integers(), st.tuples(st.integers()), st.none()))
        state[key] = state.pop(name) if draw(st.booleans()) else torch.zeros(1)
    elif kind == "values":
        state[name] = draw(st.sampled_from([None, 3, "weights", [1.0, 2.0], {"a": torch.zeros(1)},
                                            (torch.zeros(1),)]))
    elif kind == "dtype":
        state[name] = state[name].to(draw(st.sampled_from(
            [torch.complex64, torch.bool, torch.int8, torch.float16, torch.bfloat16, torch.float64, torch.uint8])))
    elif kind == "shape":
        state[name] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=5)))
    elif kind == "wrap":
        state = {draw(st.sampled_from(["state_dict", "model", "model_state", "net"])): state,
                 "epoch": draw(st.integers()), "optimizer": {"lr": 0.1}}
    elif kind == "evil":
        state[draw(st.sampled_from([name, "extra"]))] = RunsCode(_marker_code(marker))
    elif kind == "empty":
        state = {}
    elif kind == "scalar":
        state = draw(st.sampled_from([None, 7, "text", [torch.zeros(1)], torch.zeros(3)]))
    return state, draw(st.sampled_from(["zip", "zip", "zip", "legacy", "pickle"]))


def _save(obj: Any, how: str, path: Path) -> None:
    if how == "pickle":
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=how == "zip")


@fuzz(200)
@given(data=st.data())
def test_checkpoints_load_or_are_refused_and_never_run_code(tmp_path_factory: pytest.TempPathFactory,
                                                            data: st.DataObject) -> None:
    folder = tmp_path_factory.mktemp("ckpt")
    marker = folder / "ran"
    obj, how = data.draw(hostile_checkpoint(marker), label="checkpoint")
    path = folder / "weights.pth"
    _save(obj, how, path)
    damage = data.draw(st.sampled_from(["none", "none", "truncate", "flip"]), label="damage")
    if damage != "none":
        blob = path.read_bytes()
        path.write_bytes(cut(data.draw, blob) if damage == "truncate" else flip_bytes(data.draw, blob))
    copied = read_or_refuse(lambda: _copied_into(Tiny(), path))
    # Built on the meta device around the file's tensors: the same refusals, and the same model when it loads.
    built = read_or_refuse(lambda: build_with_weights(Tiny, lambda m: m, path, "tiny"))
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert isinstance(built, DissectionError) == isinstance(copied, DissectionError)
    if isinstance(built, nn.Module) and isinstance(copied, nn.Module):
        mine, theirs = built.state_dict(), copied.state_dict()
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in theirs)


def _copied_into(model: nn.Module, path: Path) -> nn.Module:
    load_weights(model, path, "tiny")
    return model


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "ran"
    state = dict(Tiny().state_dict())
    state["conv1.weight"] = RunsCode(_marker_code(marker))
    _save(state, how, tmp_path / "evil.pth")
    pickle.loads(pickle.dumps(RunsCode(_marker_code(tmp_path / "control"))))  # the payload works when run
    assert (tmp_path / "control").exists()
    with pytest.raises(DissectionError) as caught:
        read_state_dict(tmp_path / "evil.pth")
    message = str(caught.value)
    assert "evil.pth" in message and "(exec)" in message and "weights_only=True" in message
    assert "\n" not in message and "trust" not in message  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


def test_a_checkpoint_zip_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    """torch reads deflated zip members too: 100 MB of zeros in a 100 kB checkpoint."""
    torch.save({"conv1.weight": torch.zeros(25_000_000)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as src, \
            zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert (tmp_path / "bomb.pth").stat().st_size < 200_000
    with pytest.raises(DissectionError, match=r"weights file .*bomb\.pth is a zip bomb: its member .* inflates"):
        read_state_dict(tmp_path / "bomb.pth")
    assert set(read_state_dict(tmp_path / "plain.pth")) == {"conv1.weight"}  # a stored checkpoint is fine


def test_non_string_keys_are_no_state_dict(tmp_path: Path) -> None:
    torch.save({1: torch.zeros(1)}, tmp_path / "int-keys.pth")
    with pytest.raises(DissectionError, match="holds no state dict of tensors"):
        read_state_dict(tmp_path / "int-keys.pth")


# ------------------------------------------------------------------------------------------- found by fuzzing

def test_an_undefined_input_type_is_one_line(tmp_path: Path) -> None:
    """Element type 0 (UNDEFINED) was a KeyError from onnx.helper."""
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_graph(elem_type=TensorProto.UNDEFINED).SerializeToString())
    with pytest.raises(DissectionError, match=r"input 'image' takes UNDEFINED values; an image model takes floats"):
        OnnxBackend(path, BackendOptions())


def test_names_that_are_not_utf8_are_one_line(tmp_path: Path) -> None:
    """protobuf hands such names over as bytes; they were a UnicodeDecodeError when the session was made."""
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_graph().SerializeToString().replace(b"\x03out", b"\x03\x80ut"))
    with pytest.raises(DissectionError, match=r"the value name b'\\x80ut' is not UTF-8 text"):
        OnnxBackend(path, BackendOptions())


def test_onnxruntime_prints_nothing_when_it_refuses_a_graph(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An operator name that is not UTF-8 makes onnxruntime print an 'EP Error' banner to stdout and retry."""
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_graph().SerializeToString().replace(b"Relu", b"Rel\xdb", 1))
    outcome = read_or_refuse(lambda: run_onnx(path))
    assert isinstance(outcome, DissectionError) and "onnxruntime cannot load" in str(outcome)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("dims", [[1, 4], [1, 50, 4], [1, 4, 1, 1, 1]])
def test_shapes_the_graph_declares_but_does_not_compute_are_one_line(tmp_path: Path, dims: list[int]) -> None:
    """value_info that lies about a tensor: a ValueError in the token layout, or a map of the wrong rank."""
    model = tiny_graph()
    model.graph.value_info.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, dims))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    backend = OnnxBackend(path, BackendOptions())
    names = [info.name for info in backend.layers()]
    assert "r1" in names
    outcome = read_or_refuse(lambda: backend.activations(torch.zeros(2, 3, 16, 16), ["r1"]))
    if isinstance(outcome, DissectionError):
        assert "tensor 'r1' is (2, 4, 16, 16) when the model runs" in str(outcome)
    else:  # declared as a vector: not listed as spatial, the run refuses it by name
        assert not next(i for i in backend.layers() if i.name == "r1").spatial


def test_a_damaged_checkpoint_zip_directory_is_one_line(tmp_path: Path) -> None:
    """zipfile raised UnicodeDecodeError on a flipped byte in a member name; torch's own reader differs, so
    a zip this one cannot check is refused rather than handed on."""
    torch.save(Tiny().state_dict(), tmp_path / "w.pth")
    blob = bytearray((tmp_path / "w.pth").read_bytes())
    central = blob.rindex(b"PK\x01\x02")
    blob[central + 46] = 0x80  # the first byte of the last member's name
    blob[central + 8] |= 0x08  # ... and flag the names as UTF-8
    (tmp_path / "w.pth").write_bytes(bytes(blob))
    outcome = read_or_refuse(lambda: read_state_dict(tmp_path / "w.pth"))
    assert isinstance(outcome, DissectionError) and "w.pth is a damaged zip archive (UnicodeDecodeError" in str(outcome)


def test_complex_values_for_real_weights_are_refused(tmp_path: Path) -> None:
    """They loaded with a 'discards the imaginary part' warning on stderr."""
    state = Tiny().state_dict()
    state["conv1.bias"] = state["conv1.bias"].to(torch.complex64)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(DissectionError, match=r"keys 1 of another shape or kind \(e\.g\. conv1\.bias\)"):
        load_weights(Tiny(), tmp_path / "w.pth", "tiny")


def test_a_damaged_pickle_names_the_problem_not_torchs_advice(tmp_path: Path) -> None:
    """torch's message for an unknown opcode is many lines that end in 'Unsupported operand N'."""
    torch.save(Tiny().state_dict(), tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    blob = bytearray((tmp_path / "w.pth").read_bytes())
    blob[2] = 0xFF  # an opcode no unpickler knows, in the first pickle
    (tmp_path / "w.pth").write_bytes(bytes(blob))
    outcome = read_or_refuse(lambda: read_state_dict(tmp_path / "w.pth"))
    assert isinstance(outcome, DissectionError) and "trust" not in str(outcome)
    assert "w.pth is refused: it is no checkpoint torch reads as data" in str(outcome)
    assert str(outcome).endswith("Unsupported operand 255")


def test_an_input_size_too_large_to_feed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(tiny_graph(), str(path))
    with pytest.raises(DissectionError, match=r"would take --input-size 20000,20000 .*pass a smaller --input-size"):
        OnnxBackend(path, BackendOptions(input_size=(20_000, 20_000)))
