"""Fault injection through the CLI: installed plugins that break in every way a plugin can break never break
a run of the built-ins; each failure is one line, saved in summary.json, shown by `dissect plugins`; with
--strict-plugins (or NETDISSECTION_STRICT_PLUGINS=1) each is an error in one line, exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error

#: plugin (entry-point name) → (its module's source, where it fails, what its error says)
FAULTS = {
    "fault_detect": ("""
import netdissection
@netdissection.hookimpl
def dissect_detect_backend(model_ref):
    raise RuntimeError("detect boom")
""", "dissect_detect_backend", "detect boom"),
    "fault_run_start": ("""
import os
import netdissection
@netdissection.hookimpl
def dissect_run_start(run):
    if not os.environ.get("FAULT_RUN_START_FIXED"):
        raise RuntimeError("run-start boom")
""", "dissect_run_start", "run-start boom"),
    "fault_layer_finish": ("""
import netdissection
@netdissection.hookimpl
def dissect_layer_finish(run, result):
    raise ValueError("layer-finish boom")
""", "dissect_layer_finish", "layer-finish boom"),
    "fault_writer": ("""
import netdissection
class Broken:
    def write(self, result, out_dir):
        raise OSError("writer boom")
@netdissection.hookimpl
def dissect_register_reporters(register):
    register("broken-writer", Broken, description="always fails", default=True)
""", "report writer 'broken-writer'", "writer boom"),
    "fault_import": ("""
raise ImportError("import boom: this plugin needs a package that is not installed")
""", "import", "import boom"),
    "fault_clash": ("""
import netdissection
class Rule:
    pass
class Writer:
    def write(self, result, out_dir):
        return []
@netdissection.hookimpl
def dissect_register_thresholds(register):
    register("quantile", Rule, description="a second quantile")
@netdissection.hookimpl
def dissect_register_reporters(register):
    register("tally", Writer, description="a second tally")
""", "dissect_register_thresholds", "'quantile' is registered by both"),
}
#: Each failure as (plugin, where): the clash fails twice.
FAILURES = [(name, where) for name, (_, where, _) in FAULTS.items()] + [("fault_clash", "dissect_register_reporters")]
BUILT_IN_RESULTS = ("layer1/tally.csv", "layer1/thresholds.csv", "layer1/counts.npz", "summary.json",
                    "report.html", "layer1/unique_detectors.svg")


@pytest.fixture(scope="module")
def faulty_dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per faulty plugin: its module and a distribution declaring it as an entry point."""
    root = tmp_path_factory.mktemp("faulty-plugins")
    folders = {}
    for name, (source, _, _) in FAULTS.items():
        folder = root / name
        folder.mkdir()
        module = f"netdissection_{name}"
        (folder / f"{module}.py").write_text(source)
        dist = folder / f"netdissection_{name}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: netdissection-{name}\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(f"[netdissection]\n{name} = {module}\n")
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=8, image_size=32, seed=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETDISSECTION_CACHE", str(tmp_path / "cache"))  # where run-time failures are kept
    monkeypatch.delenv("NETDISSECTION_STRICT_PLUGINS", raising=False)


def _install(monkeypatch: pytest.MonkeyPatch, folders: list[Path]) -> None:
    for folder in folders:
        monkeypatch.syspath_prepend(str(folder))


def _run(run_cli, concept_set: Path, out: Path, *extra: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    # --no-store: every run here must run its hooks, not read an earlier test's results from the store.
    return run_cli("resnet18", "--dataset", concept_set, "--layer", "layer1", "--top-k", "2", "--workers", "0",
                   "--no-store", "--out", out, *extra)


def test_a_run_of_the_built_ins_survives_every_broken_plugin(run_cli, faulty_dists: dict[str, Path],  # type: ignore[no-untyped-def]
                                                             concept_set: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, list(faulty_dists.values()))
    out = tmp_path / "out"
    code, stdout, err = _run(run_cli, concept_set, out)
    assert code == 0, err
    assert "Traceback" not in err
    for name in BUILT_IN_RESULTS:
        assert (out / name).is_file(), name
    # One line per failure, naming the plugin and its error.
    warnings = [line for line in err.splitlines() if line.startswith("warning: plugin")]
    assert len(warnings) == len(FAILURES), err
    for plugin, where in FAILURES:
        lines = [line for line in warnings if f"'{plugin}'" in line and (where in line or where == "import")]
        assert len(lines) == 1, (plugin, where, err)
    for name, (_, _, message) in FAULTS.items():
        assert any(message in line for line in warnings if f"'{name}'" in line), (name, err)
    # Saved in the summary, which lists every built-in file written and none of the broken writer's.
    summary = json.loads((out / "summary.json").read_text())
    assert {(f["plugin"], f["where"]) for f in summary["plugin_errors"]} == set(FAILURES)
    assert set(BUILT_IN_RESULTS) <= set(summary["written"])
    assert summary["provenance"]["backend"] == "torchvision"
    assert summary["provenance"]["threshold_rule"]["plugin"] == "quantile"  # the clash kept the first one
    assert "layer1:" in stdout

    # `dissect plugins` shows every failure: at load, at registration, and in that run.
    code, listing, err = run_cli("plugins")
    assert code == 0, err
    flat = " ".join(listing.split())
    for name, (_, where, message) in FAULTS.items():
        assert f"{name} (netdissection-{name}): {where}:" in flat and message in flat, (name, listing)
    assert "dissect_register_reporters: ConflictError: report writer 'tally'" in flat
    code, text, _ = run_cli("plugins", "--json")
    assert code == 0
    status = {p["name"]: p for p in json.loads(text)["plugins"]}
    assert status["fault_import"]["status"] == "error"
    assert len(status["fault_clash"]["errors"]) == 2
    for name in ("fault_detect", "fault_run_start", "fault_layer_finish", "fault_writer"):
        assert status[name]["status"] == "failed at run time", status[name]
        assert status[name]["runtime_errors"][0]["where"] == FAULTS[name][1]
    assert status["torchvision_backend"]["status"] == "ok"

    # The broken writer cost only its own files: `dissect report` rebuilds from the saved results.
    (out / "report.html").unlink()
    code, _, err = run_cli("report", out, "--report", "html")
    assert code == 0, err
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(("fault", "how"), [(fault, "flag") for fault in FAULTS]
                         + [("fault_import", "environment"), ("fault_run_start", "environment")])
def test_strict_plugins_make_each_failure_an_error(run_cli, faulty_dists: dict[str, Path], concept_set: Path,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str,
                                                   how: str) -> None:
    _install(monkeypatch, [faulty_dists[fault]])
    extra = ("--strict-plugins",) if how == "flag" else ()
    if how == "environment":
        monkeypatch.setenv("NETDISSECTION_STRICT_PLUGINS", "1")
    code, _, err = _run(run_cli, concept_set, tmp_path / "out", *extra)
    assert_one_line_error(code, err, f"'{fault}'", FAULTS[fault][2], "--strict-plugins")
    if fault == "fault_writer":  # the counts and the summary were saved before any writer ran
        assert (tmp_path / "out/layer1/counts.npz").is_file() and (tmp_path / "out/summary.json").is_file()
        code, _, err = run_cli("report", tmp_path / "out", "--report", "tally")
        assert code == 0, err
        assert (tmp_path / "out/layer1/tally.csv").is_file()


def test_without_the_broken_plugins_nothing_is_left_to_show(run_cli, faulty_dists: dict[str, Path],  # type: ignore[no-untyped-def]
                                                            concept_set: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A run-time failure is shown until the same hook of the same plugin runs fine again."""
    _install(monkeypatch, [faulty_dists["fault_run_start"]])
    code, _, err = _run(run_cli, concept_set, tmp_path / "a")
    assert code == 0 and "run-start boom" in err
    code, listing, _ = run_cli("plugins")
    assert "run-start boom" in listing
    monkeypatch.setenv("FAULT_RUN_START_FIXED", "1")  # the plugin is fixed
    code, _, err = _run(run_cli, concept_set, tmp_path / "b")
    assert code == 0 and "warning" not in err, err
    code, listing, _ = run_cli("plugins")
    assert "run-start boom" not in listing and "failed at run time" not in listing

