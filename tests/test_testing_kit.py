"""netdissection.testing: its checks pass on the built-in components and catch each broken promise; its
reference counts equal a real run's; its pytest plugin is enabled by one line."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import netdissection
from netdissection.core.files import atomic_write_text
from netdissection.testing import (
    check_backend,
    check_dataset,
    check_report_writer,
    check_threshold_rule,
    reference_counts,
    reference_maps,
    tiny_model,
    write_tiny_broden,
    write_tiny_folder,
)


@pytest.fixture(scope="module")
def host() -> Any:
    return netdissection.build_host(entry_points=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    return {"broden": write_tiny_broden(root / "broden", images=8),
            "folder": write_tiny_folder(root / "folder", images=8)}


@pytest.fixture(scope="module")
def run(sets: dict[str, Path], host: Any) -> netdissection.RunResult:
    return netdissection.dissect(tiny_model(), dataset=str(sets["broden"]), layers=["conv2"], workers=0, host=host)


def tiny_backend(host: Any) -> Any:
    options = netdissection.BackendOptions(input_size=(32, 32))
    return host.component("backend", "torchvision").factory(tiny_model(), options)


# ------------------------------------------------------------------------------------------------ backends


class Wrapped:
    """A backend that delegates to another one, to break one promise at a time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def layers(self) -> Any:
        return self.inner.layers()

    def input_spec(self) -> Any:
        return self.inner.input_spec()

    def describe(self) -> Any:
        return self.inner.describe()

    def activations(self, images: Any, layers: Any) -> Any:
        return self.inner.activations(images, layers)


class BatchDependent(Wrapped):
    def activations(self, images: Any, layers: Any) -> Any:
        return {k: v - v.mean(0, keepdim=True) for k, v in self.inner.activations(images, layers).items()}


class ForwardPerLayer(Wrapped):
    def activations(self, images: Any, layers: Any) -> Any:
        return {name: self.inner.activations(images, [name])[name] for name in layers}


class WrongShape(Wrapped):
    def layers(self) -> Any:
        from netdissection import LayerInfo

        return [LayerInfo(i.name, i.kind, (i.shape[0] + 1, *i.shape[1:])) if i.spatial else i
                for i in self.inner.layers()]


class UnknownLayout(Wrapped):
    def input_spec(self) -> Any:
        import dataclasses

        return dataclasses.replace(self.inner.input_spec(), memory_format="nhwc")


def test_check_backend_passes_the_torchvision_backend(host: Any) -> None:
    maps = check_backend(tiny_backend(host))
    assert set(maps) == {"conv1", "relu1", "conv2", "relu2"} and tuple(maps["conv2"].shape) == (2, 16, 8, 8)


@pytest.mark.parametrize(("broken", "message"), [
    (BatchDependent, "batch dependence"),
    (ForwardPerLayer, "ONE forward pass"),
    (WrongShape, "layers\\(\\) promised"),
    (UnknownLayout, "memory_format"),
])
def test_check_backend_catches(host: Any, broken: type, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_backend(broken(tiny_backend(host)))


# ------------------------------------------------------------------------------------------------ datasets


@pytest.mark.parametrize("fmt", ["broden", "folder"])
def test_check_dataset_passes_the_built_in_formats(sets: dict[str, Path], host: Any, fmt: str) -> None:
    factory = host.component("dataset", fmt).factory
    samples = check_dataset(factory(str(sets[fmt])), reopen=factory)
    assert len(samples) == 8
    check_dataset(factory(str(sets[fmt]), categories=["color", "object"]), reopen=factory)


class AliensDataset:
    """A dataset whose sample 3 carries a label the vocabulary does not know."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.vocabulary = inner, inner.vocabulary

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Any:
        sample = self.inner.load(index, image=image, labels=labels)
        if index == 3 and sample.layers is not None:
            sample.layers = sample.layers.copy()
            sample.layers[0, 0, 0] = 999
        return sample

    def describe(self) -> Any:
        return self.inner.describe()


class Forgetful(AliensDataset):
    """A dataset whose describe() does not say where it is."""

    def load(self, index: int, *, image: bool = True, labels: bool = True) -> Any:
        return self.inner.load(index, image=image, labels=labels)

    def describe(self) -> Any:
        return {k: v for k, v in self.inner.describe().items() if k != "path"}


@pytest.mark.parametrize(("broken", "message"), [(AliensDataset, r"labels \[999\]"), (Forgetful, "lacks 'path'")])
def test_check_dataset_catches(sets: dict[str, Path], host: Any, broken: type, message: str) -> None:
    inner = host.component("dataset", "broden").factory(str(sets["broden"]))
    with pytest.raises(AssertionError, match=message):
        check_dataset(broken(inner))


# ------------------------------------------------------------------------------------------------ threshold rules


@pytest.mark.parametrize("params", [{"q": 0.1}, {"q": 0.005, "compat": "lite"}])
def test_check_threshold_rule_passes_the_quantile_rule(host: Any, params: dict[str, Any]) -> None:
    thresholds = check_threshold_rule(host.component("threshold", "quantile").factory, params)
    assert thresholds.shape == (5,)


class MeanOfBatchMaxima:
    """Wrong on purpose: the result depends on how the values were split into batches."""

    def __init__(self, units: int, values_per_unit: int) -> None:
        self.maxima: list[np.ndarray] = []

    def update(self, activations: Any) -> None:
        self.maxima.append(activations.amax(dim=(0, 2, 3)).double().numpy())

    def finish(self) -> np.ndarray:
        return np.mean(self.maxima, axis=0)


class MaxWithBadMerge:
    """Streaming is right; its merge forgets the other half."""

    def __init__(self, units: int, values_per_unit: int) -> None:
        self.top = np.full(units, -np.inf)

    def update(self, activations: Any) -> None:
        self.top = np.maximum(self.top, activations.amax(dim=(0, 2, 3)).double().numpy())

    def merge(self, other: MaxWithBadMerge) -> MaxWithBadMerge:
        return self

    def finish(self) -> np.ndarray:
        return self.top.copy()


@pytest.mark.parametrize(("rule", "message"), [(MeanOfBatchMaxima, "streaming"), (MaxWithBadMerge, "merging")])
def test_check_threshold_rule_catches(rule: type, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_threshold_rule(rule)


# ------------------------------------------------------------------------------------------------ report writers


@pytest.mark.parametrize("name", ["tally", "thresholds", "plots", "html"])
def test_check_report_writer_passes_the_built_in_writers(run: netdissection.RunResult, host: Any, tmp_path: Path,
                                                         name: str) -> None:
    # The kit audits this process's writes only: the writers that spread their figures and strips over
    # forked workers are checked with one worker, which runs the same tasks here.
    options = {"workers": 1} if name in ("plots", "html") else {}
    paths = check_report_writer(host.component("reporter", name).factory(**options), run, tmp_path)
    assert paths


class InPlace:
    def write(self, result: Any, out_dir: Path) -> list[Path]:
        path = out_dir / "report.md"
        path.write_text("# report\n")
        return [path]


class Elsewhere:
    def __init__(self, other: Path) -> None:
        self.other = other

    def write(self, result: Any, out_dir: Path) -> list[Path]:
        atomic_write_text(self.other / "side.txt", "oops")
        return [atomic_write_text(out_dir / "report.md", "# report\n")]


class Litter:
    def write(self, result: Any, out_dir: Path) -> list[Path]:
        (out_dir / ".scratch").write_text("left behind")
        return [atomic_write_text(out_dir / "report.md", "# report\n")]


class Clock:
    def write(self, result: Any, out_dir: Path) -> list[Path]:
        return [atomic_write_text(out_dir / "report.md", f"# report at {time.perf_counter_ns()}\n")]


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: InPlace(), "under its final name"),
    (lambda tmp: Elsewhere(tmp.parent / f"{tmp.name}-elsewhere"), "outside the output folder"),
    (lambda tmp: Litter(), "did not return"),
    (lambda tmp: Clock(), "other bytes"),
])
def test_check_report_writer_catches(run: netdissection.RunResult, tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path.parent / f"{tmp_path.name}-elsewhere").mkdir(exist_ok=True)
    with pytest.raises(AssertionError, match=message):
        check_report_writer(make(tmp_path), run, tmp_path)


# ------------------------------------------------------------------------------------------------ reference


def test_reference_counts_equal_a_run(run: netdissection.RunResult, sets: dict[str, Path], host: Any) -> None:
    dataset = host.component("dataset", "broden").factory(str(sets["broden"]))
    layer = run.layers["conv2"]
    maps = reference_maps(tiny_backend(host), dataset, "conv2")
    counts = reference_counts(maps, dataset, layer.thresholds)
    np.testing.assert_array_equal(counts.intersection, layer.intersection)
    np.testing.assert_array_equal(counts.truth, layer.truth)
    np.testing.assert_array_equal(counts.activation, layer.activation)
    assert layer.intersection.sum() > 0


# ------------------------------------------------------------------------------------------------ the pytest plugin


def test_the_fixtures_are_enabled_by_one_line(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["netdissection.testing"]\n')
    pytester.makepyfile(textwrap.dedent("""
        import netdissection

        class Hello:
            __name__ = "hello"

            @netdissection.hookimpl
            def dissect_register_commands(self, cli, context):
                @cli.command("hello")
                def hello():
                    context.out.print("hello, " + ", ".join(context.host.catalog("dataset").names()))

        def test_fixtures(tiny_model, tiny_broden_set, tiny_folder_set, plugin_host, dissect_cli, isolated_cache):
            assert [name for name, _ in tiny_model.named_children()][:2] == ["conv1", "relu1"]
            assert (tiny_broden_set / "index.csv").is_file() and (tiny_folder_set / "concepts.csv").is_file()
            assert "hello" in [p.name for p in plugin_host(Hello()).plugins]
            result = dissect_cli("hello", plugins=(Hello(),))
            assert result.exit_code == 0 and "hello, broden, folder" in result.stdout
            result = dissect_cli("data", "info", tiny_folder_set, "--workers", "0")
            assert result.exit_code == 0, result.stderr
            assert "folder format, 12 images" in " ".join(result.stdout.split())
    """))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_enabling_the_kit_costs_little() -> None:
    """Importing the kit loads no framework: a test suite that enables it pays for numpy and the host only."""
    import subprocess
    import sys

    code = ("import sys, netdissection.testing; "
            "print(sorted(m for m in ('torch', 'PIL', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).stdout
    assert out.strip() == "[]"
