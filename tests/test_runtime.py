"""``--runtime``: a torch model's forward pass on onnxruntime (exported in memory) gives torch's maps and
torch's dissection; ``auto`` decides on the first batch and says what it chose; what cannot run there is
refused in one line, or under ``auto`` stays on torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netdissection
from netdissection.core.errors import DissectionError
from netdissection.core.jobkey import Job, key_material, key_of
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends import runtime as runtime_module
from netdissection.plugins.backends.timm_backend import TimmBackend
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error
from .test_backend_parity import assert_same_dissection
from .test_onnx_backend import export_onnx, resnet18


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("runtime") / "set", images=24, image_size=64, seed=0)


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(resnet18(seed=7).state_dict(), path)
    return path


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator)


def assert_same_maps(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        scale = float(value.abs().max())
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=0, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize(("make", "name", "layers"), [
    (TorchvisionBackend, "resnet18", ["layer4", "layer3", "stage:1"]),
    (TimmBackend, "vit_tiny_patch16_224", ["stage:-1", "blocks.5"]),  # tokens to grids, inside the graph
    (TimmBackend, "efficientnet_b0", ["stage:-1", "stage:2"]),
])
def test_onnxruntime_gives_torchs_maps_for_any_batch(make: type, name: str, layers: list[str]) -> None:
    options = {"input_size": (64, 64)} if make is TimmBackend else {}
    on_torch = make(name, BackendOptions(**options))
    on_ort = make(name, BackendOptions(runtime="onnxruntime", **options))
    for n, seed in ((5, 0), (5, 1), (2, 2), (7, 3)):  # a new batch size after the first exports nothing again
        x = images(n, seed=seed)
        assert_same_maps(on_ort.activations(x, layers), on_torch.activations(x, layers))
    assert on_ort.describe()["runtime"] == "onnxruntime" and on_torch.describe()["runtime"] == "torch"
    # The export leaves the model as it was: in eval mode, its torch maps unchanged.
    assert not any(m.training for m in on_ort.model.modules())
    x = images(3, seed=9)
    assert_same_maps(on_ort.runtime._torch(x, tuple(layers)), on_torch.activations(x, layers))


def test_a_dissection_on_onnxruntime_equals_the_torch_one(concept_set: Path, r18_weights: Path) -> None:
    layers = ["layer3", "layer4"]
    runs = {runtime: netdissection.dissect("resnet18", weights=str(r18_weights), dataset=concept_set, layers=layers,
                                           batch_size=10, workers=0,  # 24 images: a last batch of 4
                                           backend_options={"runtime": runtime} if runtime else None)
            for runtime in (None, "onnxruntime")}
    assert runs[None].provenance["backend_details"]["runtime"] == "torch"
    details = runs["onnxruntime"].provenance["backend_details"]
    assert details["runtime"] == "onnxruntime" and details["runtime_requested"] == "onnxruntime"
    assert details["onnxruntime"]
    for layer in layers:
        assert_same_dissection(runs[None].layers[layer], runs["onnxruntime"].layers[layer])


@pytest.mark.parametrize(("margin", "chosen"), [(1e9, "onnxruntime"), (0.0, "torch")])
def test_auto_times_the_first_batch_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch, margin: float,
                                                         chosen: str, concept_set: Path, r18_weights: Path) -> None:
    """The choice is the timing's (forced here by the margin), recorded with the times in the provenance,
    and the numbers are torch's either way."""
    monkeypatch.setattr(runtime_module, "AUTO_MARGIN", margin)
    auto = netdissection.dissect("resnet18", weights=str(r18_weights), dataset=concept_set, layers=["layer4"],
                                 batch_size=10, workers=0, backend_options={"runtime": "auto"})
    details = auto.provenance["backend_details"]
    assert details["runtime"] == chosen and details["runtime_requested"] == "auto"
    assert set(details["runtime_seconds_per_batch"]) == {"torch", "onnxruntime"}
    eager = netdissection.dissect("resnet18", weights=str(r18_weights), dataset=concept_set, layers=["layer4"],
                                  batch_size=10, workers=0)
    assert_same_dissection(eager.layers["layer4"], auto.layers["layer4"])


class Unexportable(nn.Module):
    """A conv net with an operation the ONNX exporter does not have (cummax)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(x).cummax(dim=1).values)


class TracedAConstant(nn.Module):
    """A conv net whose trace keeps a value as a constant: the NumPy detour is invisible to the exporter, so
    the graph answers every batch with the noise it was traced on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = torch.from_numpy(np.ascontiguousarray(self.conv(x).detach().cpu().numpy()))
        return self.tail(shifted)


@pytest.mark.parametrize("model", [Unexportable, TracedAConstant])
def test_what_does_not_run_on_onnxruntime_is_refused_or_stays_on_torch(model: type[nn.Module],
                                                                       concept_set: Path) -> None:
    torch.manual_seed(0)
    module = model().eval()
    with pytest.raises(DissectionError, match=r"onnxruntime.*use --runtime torch$") as caught:
        netdissection.dissect(module, dataset=concept_set, layers=["tail"], batch_size=8, workers=0,
                              backend_options={"runtime": "onnxruntime"})
    assert "\n" not in str(caught.value)
    auto = netdissection.dissect(module, dataset=concept_set, layers=["tail"], batch_size=8, workers=0,
                                 backend_options={"runtime": "auto"})
    eager = netdissection.dissect(module, dataset=concept_set, layers=["tail"], batch_size=8, workers=0)
    assert auto.provenance["backend_details"]["runtime"] == "torch"
    np.testing.assert_array_equal(auto.layers["tail"].thresholds, eager.layers["tail"].thresholds)


def test_the_exporter_prints_nothing_on_the_terminal(capfd: pytest.CaptureFixture[str], concept_set: Path) -> None:
    """torch's exporter writes its graph to the process's stdout when it fails; a run under auto says one
    line in the log instead."""
    torch.manual_seed(0)
    capfd.readouterr()
    netdissection.dissect(Unexportable().eval(), dataset=concept_set, layers=["tail"], batch_size=8, workers=0,
                          backend_options={"runtime": "auto"})
    out, err = capfd.readouterr()
    assert "graph" not in out + err and "Torch IR" not in out + err


def test_runtime_through_the_cli(run_cli, tmp_path: Path, concept_set: Path, r18_weights: Path) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    common = ["resnet18", "--weights", r18_weights, "--dataset", concept_set, "--layer", "layer4",
              "--batch-size", "10", "--workers", "0", "--store", store, "--report", "tally"]
    code, _, err = run_cli(*common, "--out", tmp_path / "eager")
    assert code == 0, err
    code, out, err = run_cli(*common, "--out", tmp_path / "ort", "--runtime", "onnxruntime")
    assert code == 0, err
    assert "from the results store" not in out  # another runtime is another job
    assert "/s on onnxruntime)" in out  # the terminal's timing line says where the forward pass ran
    summary = json.loads((tmp_path / "ort" / "summary.json").read_text())
    assert summary["provenance"]["backend_details"]["runtime"] == "onnxruntime"
    code, out, err = run_cli(*common, "--out", tmp_path / "again", "--runtime", "onnxruntime")
    assert code == 0 and "from the results store" in out, err
    code, _, err = run_cli(*common, "--out", tmp_path / "bad", "--runtime", "tensorrt")
    assert code == 2 and "tensorrt" in err and "Traceback" not in err


def test_a_run_without_runtime_keeps_its_job_key() -> None:
    """Results stored before ``--runtime`` existed are found again: the option is in the key only when given."""
    plain = Job(model="resnet18")
    given = {runtime: Job(model="resnet18", backend_options={"runtime": runtime}) for runtime in ("torch", "auto")}
    host = netdissection.build_host()
    rule = {"name": "quantile", "params": {"q": 0.005}}
    material = key_material(plain, host, rule)
    assert "runtime" not in json.dumps(material["backend_options"])
    keys = {key_of(material), *(key_of(key_material(job, host, rule)) for job in given.values())}
    assert len(keys) == 3


def test_a_backend_without_runtimes_refuses_the_option(run_cli, tmp_path: Path, concept_set: Path) -> None:  # type: ignore[no-untyped-def]
    onnx_file = export_onnx(resnet18(), tmp_path / "r18.onnx")
    code, _, err = run_cli(onnx_file, "--dataset", concept_set, "--out", tmp_path / "out", "--runtime", "torch",
                           "--no-store")
    assert_one_line_error(code, err, "onnx backend", "--runtime torch", "onnxruntime")
    assert not (tmp_path / "out" / "summary.json").exists()
    code, _, err = run_cli(onnx_file, "--dataset", concept_set, "--out", tmp_path / "out", "--runtime", "auto",
                           "--no-store", "--report", "tally", "--workers", "0")
    assert code == 0, err  # a graph runs on onnxruntime: auto has one choice, and the run says which
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["provenance"]["backend_details"]["runtime"] == "onnxruntime"

    class OwnRuntime:
        """resnet18 behind a backend that offers no choice of runtime (no ``runtimes``)."""

        def __init__(self, model: object, options: BackendOptions) -> None:
            inner = TorchvisionBackend("resnet18", BackendOptions())
            self.layers, self.input_spec = inner.layers, inner.input_spec
            self.activations, self.describe = inner.activations, inner.describe

    class Opaque:
        __name__ = "opaque"

        @netdissection.hookimpl
        def dissect_register_backends(self, register):  # type: ignore[no-untyped-def]
            register("opaque", OwnRuntime, description="resnet18, however it is asked")

    host = netdissection.build_host(extra_plugins=(Opaque(),))
    with pytest.raises(DissectionError, match="opaque backend does not run on --runtime auto"):
        netdissection.dissect("anything", backend="opaque", dataset=concept_set, host=host,
                              backend_options={"runtime": "auto"})


def test_auto_without_onnxruntime_runs_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the onnx extra (or without a CUDA provider on a GPU), auto has one choice; onnxruntime asked
    for by name is an error naming the extra."""
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    auto = TorchvisionBackend("resnet18", BackendOptions(runtime="auto"))
    x = images(2)
    assert_same_maps(auto.activations(x, ["layer4"]), TorchvisionBackend("resnet18", BackendOptions()).activations(
        x, ["layer4"]))
    assert auto.describe()["runtime"] == "torch"
    with pytest.raises(DissectionError, match=r"pip install 'netdissection\[onnx\]'"):
        TorchvisionBackend("resnet18", BackendOptions(runtime="onnxruntime"))


@pytest.mark.parametrize("decided", ["onnxruntime", "torch"])
def test_auto_runs_on_what_another_process_decided(monkeypatch: pytest.MonkeyPatch, decided: str) -> None:
    """A sharded run decides ``auto`` once: a backend that adopts the decision times nothing (whatever this
    process would have found faster), runs on that runtime with torch's maps and records who decided."""
    monkeypatch.setattr(runtime_module, "AUTO_MARGIN", 1e9 if decided == "torch" else 0.0)  # its own pick: the other
    measured = {"torch": 0.5, "onnxruntime": 0.25}
    auto = TorchvisionBackend("resnet18", BackendOptions(runtime="auto"))
    auto.adopt_runtime({"runtime": decided, "runtime_seconds_per_batch": measured}, "shard 0")
    eager = TorchvisionBackend("resnet18", BackendOptions())
    for n, seed in ((4, 0), (3, 1)):
        x = images(n, seed=seed)
        assert_same_maps(auto.activations(x, ["layer4"]), eager.activations(x, ["layer4"]))
    details = auto.describe()
    assert details["runtime"] == decided and details["runtime_requested"] == "auto"
    assert details["runtime_seconds_per_batch"] == measured and details["runtime_decided_by"] == "shard 0"
    assert bool(auto.runtime._graphs) == (decided == "onnxruntime")
    # Asked for by name, a runtime is not another process's to change.
    named = TorchvisionBackend("resnet18", BackendOptions(runtime="torch"))
    named.adopt_runtime({"runtime": "onnxruntime"}, "shard 0")
    assert named.describe()["runtime"] == "torch" and "runtime_decided_by" not in named.describe()
    with pytest.raises(DissectionError, match="--runtime auto was decided as 'tensorrt' by shard 0"):
        auto.adopt_runtime({"runtime": "tensorrt"}, "shard 0")


def test_compare_takes_the_runtime(run_cli, tmp_path: Path, concept_set: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("compare", "resnet18", "--dataset", concept_set, "--layer", "layer4", "--runtime",
                           "onnxruntime", "--batch-size", "12", "--workers", "0", "--store", tmp_path / "store",
                           "--out", tmp_path / "cmp")
    assert code == 0, err
    [run] = [p for p in (tmp_path / "cmp" / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["provenance"]["backend_details"]["runtime"] == "onnxruntime"
