"""The ``ray`` executor: shards of each model's dataset in Ray actors, merged exactly on the driver.

One local Ray cluster (2 CPUs) serves the module; the ``--address`` test starts its own with ``ray start
--head`` and stops exactly that cluster's processes. Every sharded run is checked byte for byte against the
unsharded local run: ``tally.csv``, ``thresholds.csv`` and every array of ``counts.npz``.

The reference runs torch with one thread, as each shard's worker does (one CPU each): CPU kernels may round
differently with another number of threads, sharded or not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import netdissection
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.plugins.thresholds.quantile import QuantileRule

from .cli_checks import assert_one_line_error

MODEL = "timm:test_resnet"
#: Two layers: stage:-2 (192 units × 4×4) would keep its top values in 2,304 bytes, over the cap, so its
#: threshold takes a radix selection over several reads; stage:-1 (96 units × 2×2, 1,152 bytes) answers after one.
LAYERS = ("stage:-1", "stage:-2")
MEMORY_CAP = 2000
BATCH = 4  # 12 images: three shards of one batch each


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=12, image_size=64, seed=0)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster of 2 CPUs for the module (token authentication off: nothing is written to ~/.ray)."""
    ray = pytest.importorskip("ray")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             object_store_memory=200 * 2**20, namespace="netdissection-tests")
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def options(compat: str) -> dict[str, Any]:
    return {"layers": list(LAYERS), "threshold_params": {"memory_cap": MEMORY_CAP}, "compat": compat,
            "batch_size": BATCH, "workers": 0, "reporters": ["tally", "thresholds"]}


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def reference(concept_set: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unsharded local run's folder, per semantics."""
    runs = {}
    for compat in ("paper", "lite"):
        out = tmp_path_factory.mktemp(f"local-{compat}")
        with torch_threads(1):
            table = netdissection.compare([MODEL], dataset=concept_set, store=False, out=out, **options(compat))
        assert [r["status"] for r in table] == ["ok", "ok"]
        runs[compat] = out / "runs" / "test_resnet"
    return runs


def files_of(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.glob("*/*.csv"))}


def assert_same_run(got: Path, expected: Path) -> None:
    """tally.csv and thresholds.csv (and explanations.csv where there are) byte for byte, and every array of
    counts.npz bit for bit."""
    files = files_of(expected)
    assert sum(name.endswith(("/tally.csv", "/thresholds.csv")) for name in files) == 4  # two layers, two each
    assert files_of(got) == files
    for npz in sorted(expected.glob("*/counts.npz")):
        with np.load(npz) as a, np.load(got / npz.relative_to(expected)) as b:
            assert a.files == b.files
            for name in a.files:
                assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), (npz, name)


def test_one_layer_needs_several_reads(reference: dict[str, Path]) -> None:
    """The cap splits the two layers as the test means: one radix selection, one top-k."""
    for compat, run in reference.items():
        modes = {}
        for layer in json.loads((run / "summary.json").read_text())["layers"]:
            with np.load(run / layer["module"] / "counts.npz") as counts:
                units, h, w = counts["top_maps"].shape[0], *counts["top_maps"].shape[2:]
            modes[layer["layer"]] = QuantileRule(units, 12 * h * w, compat=compat, memory_cap=MEMORY_CAP).mode
        assert modes == {"stage:-1": "top-k", "stage:-2": "radix"}, compat


@pytest.mark.slow
def test_three_shards_equal_the_unsharded_run(ray_cluster: Any, concept_set: Path, reference: dict[str, Path],
                                              tmp_path: Path) -> None:
    """Paper semantics on 3 shards; beside it a job whose weights do not fit (a failed row, the other goes on);
    the run is committed to the store like a local run, and found there the next time."""
    import torch

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    models = tmp_path / "models.txt"
    models.write_text(f"{MODEL}\n{MODEL} --weights other.pt --name broken\n", encoding="utf-8")
    store, out = tmp_path / "store", tmp_path / "cmp"
    table = netdissection.compare(models_file=models, dataset=concept_set, store=store, out=out, executor="ray",
                                  executor_options={"shards": 3}, **options("paper"))
    assert_same_run(out / "runs" / "test_resnet", reference["paper"])
    ok = [r for r in table if r["status"] == "ok"]
    assert [r["layer"] for r in ok] == list(LAYERS)
    [failed] = table.failed
    assert failed["model"] == "broken"
    assert failed["error"].startswith(f"checkpoint {tmp_path / 'other.pt'} does not fit test_resnet: keys 91 missing")
    assert "\n" not in failed["error"]

    summary = json.loads((out / "runs" / "test_resnet" / "summary.json").read_text())
    executor = summary["provenance"]["executor"]
    assert executor["name"] == "ray" and executor["shards"] == 3 and executor["shard_images"] == [4, 4, 4]
    assert executor["cluster"]["address"] == ray_cluster.get_runtime_context().gcs_address
    assert executor["cluster"]["resources"]["CPU"] == 2.0 and executor["cluster"]["nodes"] == 1
    assert executor["per_shard"] == {"CPU": 0.6666} and executor["torch_threads_per_shard"] == 1
    assert executor["restarted_shards"] == []
    assert executor["shard_runtimes"] == ["torch"] * 3  # what each shard's backend ran on
    assert summary["provenance"]["backend_details"]["runtime"] == "torch"
    assert summary["provenance"]["layers"] == list(LAYERS)  # as a local run records them
    assert json.loads((out / "compare.json").read_text())["executor"] == "ray"

    again = netdissection.compare([MODEL], dataset=concept_set, store=store, out=tmp_path / "again",
                                  **options("paper"))  # the local executor: the store has the Ray run
    assert [o.cached for o in again.outcomes] == [True]
    assert_same_run(tmp_path / "again" / "runs" / "test_resnet", reference["paper"])
    failed_key = table.outcomes[1].key
    assert failed_key is not None and not (store / "jobs" / failed_key).exists()  # a failure leaves nothing


@pytest.mark.slow
def test_bootstrap_on_shards_equals_the_unsharded_bootstrap(ray_cluster: Any, concept_set: Path,
                                                            tmp_path: Path) -> None:
    """The shards count into blocks of the whole dataset's images: merged, the intervals (tally.csv's last
    columns, counts.npz's block arrays, summary.json's intervals) are those of the local run."""
    resampled = {**options("paper"), "bootstrap": 20, "bootstrap_seed": 3}
    with torch_threads(1):
        netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "local", **resampled)
    netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "ray", executor="ray",
                          executor_options={"shards": 3}, **resampled)
    local, sharded = tmp_path / "local" / "runs" / "test_resnet", tmp_path / "ray" / "runs" / "test_resnet"
    assert_same_run(sharded, local)
    assert all("score-lo" in tally.read_text().splitlines()[0] for tally in local.glob("*/tally.csv"))
    layers = {name: json.loads((run / "summary.json").read_text())["layers"] for name, run in
              (("local", local), ("ray", sharded))}
    assert [layer["bootstrap"] for layer in layers["ray"]] == [layer["bootstrap"] for layer in layers["local"]]


@pytest.mark.slow
def test_explanations_on_shards_equal_the_unsharded_run(ray_cluster: Any, concept_set: Path, tmp_path: Path) -> None:
    """--explain on 3 shards: every read of the formula search goes to each shard's worker (the explainer's
    accumulators pickled to it) and is merged on the driver; explanations.csv equals the local run's byte for
    byte, as do the counts, and the provenance records the explainer as a local run does."""
    explained = {**options("paper"), "explain": "compositional",
                 "explain_params": {"formula_length": 2, "beam": 3}, "explain_units": "1-40"}
    with torch_threads(1):
        netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "local", **explained)
    netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "ray", executor="ray",
                          executor_options={"shards": 3}, **explained)
    local, sharded = tmp_path / "local" / "runs" / "test_resnet", tmp_path / "ray" / "runs" / "test_resnet"
    assert_same_run(sharded, local)  # explanations.csv too
    expected = sorted(local.glob("*/explanations.csv"))
    assert len(expected) == 2
    for path in expected:
        rows = path.read_text().splitlines()[1:]
        assert [int(row.split(",")[0]) for row in rows] == list(range(1, 41))
        assert any(" AND " in row or " OR " in row for row in rows)  # formulas, not only single concepts
        assert (sharded / path.relative_to(local)).read_bytes() == path.read_bytes()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (local, sharded)]
    assert summaries[1]["provenance"]["explainer"] == summaries[0]["provenance"]["explainer"]
    assert summaries[1]["provenance"]["executor"]["shards"] == 3 and summaries[1]["seconds"]["explain"] > 0


@pytest.mark.slow
def test_runtime_auto_is_decided_once_for_every_shard(ray_cluster: Any, concept_set: Path, tmp_path: Path) -> None:
    """--runtime auto on 3 shards: shard 0's backend decides on its first batch and every shard runs on its
    choice (left to each shard's own timing, shards could differ, and the merged thresholds would mix two
    runtimes' rounding); the run equals the unsharded run on that runtime byte for byte."""
    auto = {**options("paper"), "backend_options": {"runtime": "auto"}}
    netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "ray", executor="ray",
                          executor_options={"shards": 3}, **auto)
    sharded = tmp_path / "ray" / "runs" / "test_resnet"
    provenance = json.loads((sharded / "summary.json").read_text())["provenance"]
    details, executor = provenance["backend_details"], provenance["executor"]
    chosen = details["runtime"]
    assert details["runtime_requested"] == "auto" and set(details["runtime_seconds_per_batch"]) == {
        "torch", "onnxruntime"}
    assert executor["runtime_decided_by"] == "shard 0" and executor["shard_runtimes"] == [chosen] * 3
    with torch_threads(1):
        netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "local",
                              **{**options("paper"), "backend_options": {"runtime": chosen}})
    assert_same_run(sharded, tmp_path / "local" / "runs" / "test_resnet")


def kill_shard(ray: Any, shard: int, *, wait: bool) -> None:
    """Kill the process of the worker of ``shard`` (``ray.kill``, restart allowed, as a crash would end it);
    with ``wait``, until Ray has restarted it."""
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"-shard{shard}")]
    assert len(named) == 1, named
    actor = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
    ray.kill(actor, no_restart=False)
    if wait:
        ray.get(actor.__ray_ready__.remote())


class KillingEvents:
    """Job events whose progress kills workers as the driver runs the passes: shard 0 just after the
    activation pass is sent (Ray retries the call on the restarted worker), shard 2 once that pass is
    merged (the next reads go to a restarted worker, which reads its shard again before answering)."""

    def __init__(self, ray: Any) -> None:
        self.ray = ray
        self.passes: list[str] = []
        self.killed: list[int] = []

    def job_started(self, index: int, job: Any, total: int) -> KillingEvents:
        return self

    def job_finished(self, outcome: Any) -> None:
        pass

    def start(self, name: str, total: int) -> None:
        self.passes.append(name)
        if name == "activations":
            kill_shard(self.ray, 0, wait=False)
            self.killed.append(0)

    def advance(self, images: int) -> None:
        pass

    def finish(self) -> None:
        if self.passes == ["activations"] and 2 not in self.killed:
            kill_shard(self.ray, 2, wait=True)
            self.killed.append(2)


@pytest.mark.slow
def test_killed_workers_are_retried_and_the_result_is_unchanged(ray_cluster: Any, concept_set: Path,
                                                                 reference: dict[str, Path], tmp_path: Path) -> None:
    """Lite semantics on 3 shards with two workers killed mid-job: equal to the unsharded run."""
    events = KillingEvents(ray_cluster)
    table = netdissection.compare([MODEL], dataset=concept_set, store=False, out=tmp_path / "cmp", executor="ray",
                                  executor_options={"shards": 3}, events=events, **options("lite"))
    assert [r["status"] for r in table] == ["ok", "ok"]
    assert events.killed == [0, 2]
    assert events.passes.count("thresholds") >= 2  # the radix layer: several reads, merged between them
    run = tmp_path / "cmp" / "runs" / "test_resnet"
    assert_same_run(run, reference["lite"])
    executor = json.loads((run / "summary.json").read_text())["provenance"]["executor"]
    assert executor["restarted_shards"] == [0, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_with(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop_cluster(leader: int, temp: Path) -> list[int]:
    """Stop the cluster that ``ray start`` started in its own process group, and only it (``ray stop`` would
    stop every Ray process of the machine): the group, then any process of the cluster outside it (named by
    the cluster's own folder in its command line). Returns those still running after that."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(leader, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while processes_with(str(temp)) and time.monotonic() < deadline:  # workers end with their raylet
        time.sleep(0.2)
    for pid in processes_with(str(temp)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    return processes_with(str(temp))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops the cluster by its process group")
def test_address_joins_a_cluster_started_with_ray_start(concept_set: Path, reference: dict[str, Path],
                                                        tmp_path: Path) -> None:
    pytest.importorskip("ray")
    port = free_port()
    # Short: Ray's socket paths under it must stay within the 107 characters a Unix socket allows.
    temp = Path(tempfile.mkdtemp(prefix="ndray-"))
    # A cluster with token authentication, as `ray start` makes it; the token travels in the environment.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "COLUMNS": "160"}
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir",
                             str(temp), "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        started, _ = head.communicate(timeout=180)
        assert head.returncode == 0, started
        out = tmp_path / "cmp"
        done = subprocess.run(
            [sys.executable, "-m", "netdissection.cli", "compare", MODEL, "--dataset", str(concept_set), "--executor",
             "ray", "--address", f"127.0.0.1:{port}", "--shards", "2", "--no-store", "--out", str(out),
             "--threshold-param", f"memory_cap={MEMORY_CAP}", *[a for layer in LAYERS for a in ("--layer", layer)],
             "--batch-size", str(BATCH), "--workers", "0", "--report", "tally,thresholds"],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        run = out / "runs" / "test_resnet"
        assert_same_run(run, reference["paper"])
        executor = json.loads((run / "summary.json").read_text())["provenance"]["executor"]
        assert executor["cluster"]["address"].endswith(f":{port}")
        assert executor["cluster"]["started_for_this_run"] is False
        assert executor["shards"] == 2 and executor["shard_images"] == [4, 8]
    finally:
        left = stop_cluster(head.pid, temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == []  # no process of that cluster is left running


def test_bad_shards_and_unreachable_address(run_cli: Any) -> None:
    code, _out, err = run_cli("compare", "resnet18", "--executor", "ray", "--shards", "0")
    assert_one_line_error(code, err, "--shards must be at least 1, not 0")
    pytest.importorskip("ray")
    port = free_port()  # nothing listens there
    started = time.monotonic()
    code, _out, err = run_cli("compare", "resnet18", "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert_one_line_error(code, err, f"cannot reach a Ray cluster at 127.0.0.1:{port} (connection refused)",
                          f"ray start --head --port {port}")
    assert time.monotonic() - started < 10
    code, _out, err = run_cli("compare", "resnet18", "--executor", "ray", "--address", "head-node")
    assert_one_line_error(code, err, "--address must be HOST:PORT")
    code, _out, err = run_cli("compare", "resnet18", "--address", "127.0.0.1:6379")
    assert_one_line_error(code, err, "--address does not apply to the local executor")


def test_without_ray_installed_the_error_names_the_extra(tmp_path: Path) -> None:
    """Ray hidden from the import system in a fresh process, as where the extra is not installed."""
    script = textwrap.dedent("""
        import sys

        class NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, NoRay())
        from netdissection.cli import main
        main(sys.argv[1:])
    """)
    done = subprocess.run([sys.executable, "-c", script, "compare", "resnet18", "--executor", "ray", "--out",
                           str(tmp_path / "cmp")], capture_output=True, text=True, timeout=120)
    assert_one_line_error(done.returncode, done.stderr, "--executor ray needs Ray; install it with: "
                                                        "pip install 'netdissection[ray]'")
    assert not (tmp_path / "cmp").exists()


def test_plugins_lists_the_ray_executor(run_cli: Any) -> None:
    from netdissection.registry import build_host

    entry = build_host().catalog("executor").get("ray")
    assert entry.plugin == "ray_executor" and "pip install 'netdissection[ray]'" in entry.description
    code, out, _err = run_cli("plugins")
    assert code == 0 and "executor:ray" in out
