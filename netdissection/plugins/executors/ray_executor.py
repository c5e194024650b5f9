"""The ``ray`` executor: each job's dataset split into shards, the shards' passes run in Ray actors, and the
partials merged here, exactly.

    dissect compare resnet18 resnet50 --executor ray --shards 4             # a local Ray instance
    dissect compare resnet18 resnet50 --executor ray --address HOST:6379   # an existing cluster

A job is one model on one dataset. Its shards are runs of whole batches (``split_shards``), so the merged
thresholds and counts equal the one-process run's bit for bit. Per job, one actor per shard prepares the run
exactly as ``dissect`` does (``netdissection.prepare_job``) and keeps the model and the shard's activation
cache (a ``ShardRunner``) across the passes. This process (the driver) merges the activation passes, settles
the thresholds (sending the merged rule states back while a rule wants another read), sends the thresholds
for the IoU pass, adds the counts, and hands the run to the job context, which writes its reports and commits
it to the store as it does a local run.

Ray does the scheduling. Each job asks for a placement group of one bundle per shard, so that all of a job's
shards start together (a job never holds part of the cluster while it waits for the rest): a GPU per shard
under ``--device cuda``, and the CPUs a shard uses (one, plus its data-loading workers, within its share of
the cluster). Jobs start as the cluster has room. A worker that dies is restarted by Ray (``max_restarts``)
and the call it was running retried (``max_task_retries``); a restarted worker reads its shard again before
it answers, so the result is unchanged.

Every node needs netdissection (the same version) and the dataset, weights and model files at the same paths.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import queue
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError, first_line, refuse_options
from ...core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ...core.execution import JobContext, JobOutcome
    from ...core.explain import ExplainerChoice
    from ...core.jobkey import Job
    from ...core.protocols import ConceptDataset, ThresholdRule
    from ...core.scheduler import Progress
    from ...core.types import RunResult

log = logging.getLogger(__name__)

INSTALL = "pip install 'netdissection[ray]'"
#: How many times Ray restarts a shard's worker that died, retrying the call it was running.
RESTARTS = 3
#: Seconds to open a connection to ``--address`` before the cluster is reported unreachable.
CONNECT_TIMEOUT_S = 5.0
#: Seconds ``ray.init`` may take to join a cluster that answered.
JOIN_TIMEOUT_S = 60.0
#: Resource amounts Ray accepts are multiples of this.
RESOURCE_STEP = 1e-4


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DissectionError(f"--executor ray needs Ray; install it with: {INSTALL}") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in a line, at once, when nothing answers at ``address`` (``ray.init`` would wait for minutes)."""
    if address in ("auto", "local"):
        return  # Ray finds (or starts) the cluster itself and says so quickly
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DissectionError(f"--address must be HOST:PORT (the head node's port, as 'ray start --head' prints "
                              f"it), not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DissectionError(f"cannot reach a Ray cluster at {address} ({reason.lower()}); start one with "
                              f"'ray start --head --port {port}' or pass the head node's address") from None


def _why_not_joined(exc: BaseException) -> str | None:
    """What to tell a user whose ``ray.init(address=...)`` failed, when Ray's own words would not help."""
    chain: BaseException | None = exc
    while chain is not None:
        if type(chain).__name__ == "AuthenticationError":
            return ("it asks for its token: set RAY_AUTH_MODE=token and give the token as RAY_AUTH_TOKEN (or in "
                    "~/.ray/auth_token), as for any Ray driver")
        chain = chain.__cause__ or chain.__context__
    return None


def _bounded(call: Callable[[], Any], seconds: float, what: str,
             explain: Callable[[BaseException], str | None] = lambda exc: None) -> Any:
    """``call()`` in a thread, given up after ``seconds``; a failure is one line saying ``what`` failed."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-init", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DissectionError(f"{what}: no answer within {seconds:.0f} s; is it the head node's address?")
    if "error" in box:
        error = box["error"]
        if isinstance(error, DissectionError):
            raise error
        raise DissectionError(f"{what} failed: {explain(error) or first_line(error)}") from None
    return box.get("value")


class Cluster:
    """The Ray cluster the jobs run on: joined (``address``), reused (Ray already initialised in this
    process), or started here for this run and shut down after it."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.started = False  # True when this run initialised Ray (and shuts it down)
        self.info: dict[str, Any] = {}

    def __enter__(self) -> Cluster:
        ray = import_ray()
        if ray.is_initialized():
            if self.address not in (None, "auto") and not self._same(ray, self.address):
                current = ray.get_runtime_context().gcs_address
                raise DissectionError(f"this process is already connected to the Ray cluster at {current}; "
                                      f"--address {self.address} names another")
        else:
            # Ray's own log lines would cut through the progress bars; its errors still reach us as exceptions.
            options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                                       "namespace": "netdissection"}
            if self.address is not None:
                # Joining has no timeout of its own (a port that answers but is no Ray cluster is waited on
                # for minutes), and starts no process here: it is bounded in a thread.
                _bounded(lambda: ray.init(address=self.address, **options), JOIN_TIMEOUT_S,
                         f"joining the Ray cluster at {self.address}", _why_not_joined)
            else:
                # In this thread: the processes of a local instance live as long as the thread that started them.
                try:
                    ray.init(include_dashboard=False, **options)
                except Exception as exc:
                    raise DissectionError(f"could not start a local Ray instance: {first_line(exc)}") from None
            self.started = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        self.info = {"address": ray.get_runtime_context().gcs_address,
                     "started_for_this_run": self.started and self.address is None,
                     "ray": ray.__version__, "nodes": len(nodes),
                     "resources": {k: total[k] for k in ("CPU", "GPU", "memory") if k in total},
                     "node_cpus": max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0),
                     "node_gpus": max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)}
        log.info("Ray cluster %s: %d node%s, %g CPUs, %g GPUs", self.info["address"], len(nodes),
                 "" if len(nodes) == 1 else "s", total.get("CPU", 0.0), total.get("GPU", 0.0))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import_ray().shutdown()

    @staticmethod
    def _same(ray: Any, address: str) -> bool:
        current = ray.get_runtime_context().gcs_address
        port = address.rsplit(":", 1)[-1]
        return current == address or current.rsplit(":", 1)[-1] == port

    def resources(self, device: str, shards: int, workers: int) -> dict[str, float]:
        """What one shard's worker asks Ray for: a GPU under cuda; one CPU plus its loading workers, within its
        share of the cluster and what one node has (a job's bundles must all fit at once)."""
        info, total = self.info, self.info["resources"]
        cpus = min(1.0 + workers, total.get("CPU", 0.0) / shards, info["node_cpus"])
        cpus = math.floor(cpus / RESOURCE_STEP) * RESOURCE_STEP
        if cpus <= 0:
            raise DissectionError(f"the Ray cluster at {info['address']} has no CPU to run a shard on")
        wanted = {"CPU": round(cpus, 4)}
        if device.startswith("cuda"):
            gpus = total.get("GPU", 0.0)
            if gpus < shards or info["node_gpus"] < 1:
                raise DissectionError(f"--device cuda asks Ray for a GPU per shard: {shards} shards, and the cluster "
                                      f"at {info['address']} has {int(gpus)} GPUs; pass --shards {max(1, int(gpus))}"
                                      if gpus >= 1 else f"--device cuda: the Ray cluster at {info['address']} has no "
                                      "GPU; use --device cpu")
            wanted["GPU"] = 1.0
        return wanted

    def default_shards(self, device: str, workers: int) -> int:
        """A shard per GPU under cuda, else a shard per (1 + workers) CPUs of the cluster."""
        total = self.info["resources"]
        if device.startswith("cuda"):
            return max(1, int(total.get("GPU", 0.0)))
        return max(1, int(total.get("CPU", 1.0) // (1 + workers)))


class ShardWorker:
    """One shard of one job, in a Ray actor: the run prepared as ``dissect`` prepares it, and its passes.

    Ray restarts a worker that died and retries the call it was running; the restarted worker has read
    nothing yet, so a threshold round or the IoU pass reads the shard again first (same batches, same
    maps), and the answer is the one the first worker would have given.
    """

    def __init__(self, job: Job, indices: np.ndarray, images: int, threads: int, version: str) -> None:
        import ray

        self.error: BaseException | None = None
        self.read = False
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.node = ray.util.get_node_ip_address()
        try:
            self._prepare(job, indices, images, threads, version)
        except Exception as exc:  # raised again by every call: the driver reports it as the job's error
            self.error = exc

    def _prepare(self, job: Job, indices: np.ndarray, images: int, threads: int, version: str) -> None:
        import torch

        from ... import __version__, prepare_job
        from ...core.scheduler import ShardRunner

        if version != __version__:
            raise DissectionError(f"the Ray worker on {self.node} has netdissection {__version__} and this process "
                                  f"{version}; install the same version on every node")
        torch.set_num_threads(threads)
        # The node's temporary folder, one per user: caches that killed workers left there are removed.
        work = Path(tempfile.gettempdir()) / f"netdissection-shards-{os.getuid() if hasattr(os, 'getuid') else 0}"
        work.mkdir(parents=True, exist_ok=True)
        self.prepared = prepare_job(job, work_dir=work)
        found = len(self.prepared.plan.dataset)
        if found != images:
            raise DissectionError(f"the dataset on {self.node} has {found} images and {images} here; every node "
                                  "needs the same dataset at the same path")
        self.runner = ShardRunner(self.prepared.plan, self.prepared.spec, indices)

    def _ready(self, runtime: Mapping[str, Any] | None) -> None:
        if self.error is not None:
            raise self.error
        if not self.read:  # a restarted worker: read the shard again before answering
            self.activation_pass(runtime)

    def decide_runtime(self) -> dict[str, Any]:
        """The first shard, under ``--runtime auto``: its backend decides on the shard's first batch, and what
        it chose (of its ``describe()``, what ``adopt_runtime`` reads) goes to every shard's ``activation_pass``."""
        if self.error is not None:
            raise self.error
        self.runner.first_forward()
        described = self.prepared.plan.backend.describe()
        return {key: described[key] for key in ("runtime", "runtime_seconds_per_batch") if key in described}

    def activation_pass(self, runtime: Mapping[str, Any] | None = None) -> Any:
        """The shard's activation partial; ``runtime``: what :meth:`decide_runtime` answered, when the run
        decides ``--runtime auto`` once (every call that may be a restarted worker's first carries it)."""
        if self.error is not None:
            raise self.error
        adopt = getattr(self.prepared.plan.backend, "adopt_runtime", None)
        if runtime is not None and callable(adopt):
            adopt(runtime, "shard 0")
        partial = self.runner.activation_pass()
        self.read = True
        return partial

    def threshold_round(self, states: Mapping[str, ThresholdRule],
                        runtime: Mapping[str, Any] | None = None) -> dict[str, ThresholdRule]:
        self._ready(runtime)
        return self.runner.threshold_round(states)

    def iou_pass(self, thresholds: Mapping[str, np.ndarray], accumulator: Callable[..., Any] | None = None,
                 stage: str = "IoU", runtime: Mapping[str, Any] | None = None) -> Any:
        """The shard's counts; with an ``accumulator`` factory (an explainer's read), its partial instead."""
        self._ready(runtime)
        if accumulator is not None:
            return self.runner.iou_pass(thresholds, accumulator, stage)
        resampling = self.prepared.plan.bootstrap
        if resampling is None:
            return self.runner.iou_pass(thresholds)
        # Blocks of the whole dataset's images, so the shards' block counts add up as one run's would.
        return self.runner.iou_pass(thresholds, resampling.accumulator(len(self.prepared.plan.dataset)))

    def about(self) -> dict[str, Any]:
        """The run's provenance and resolved modules (as ``dissect`` records them), and where this shard ran."""
        if self.error is not None:
            raise self.error
        # The backend is asked again, as after a local run's passes: it records what it chose while running.
        provenance = {**self.prepared.provenance, "backend_details": self.prepared.plan.backend.describe()}
        return {"provenance": provenance, "modules": self.prepared.modules, "node": self.node,
                "restarted": self.restarted}

    def close(self) -> None:
        if self.error is None:
            self.runner.close()


class Stopped(Exception):
    """The comparison stopped (interrupted) before this job's shards started."""


@functools.cache
def _remote_worker() -> Any:
    """The Ray actor class of :class:`ShardWorker` (made once: Ray exports it to the cluster)."""
    return import_ray().remote(ShardWorker)


class _Shown:
    """The progress the user sees, shared by the jobs' threads: the passes of the job that started last.

    The context's events are called under the lock (the main thread's ``job_started``, a job thread's
    passes), so a progress display never sees two threads at once; a pass is shown as the job's thread
    runs it (its calls sent, then each shard's answer)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.current: int | None = None
        self.progress: Progress | None = None

    def show(self, index: int, call: Callable[[Progress], None]) -> None:
        with self.lock:
            if index == self.current and self.progress is not None:
                call(self.progress)


@dataclasses.dataclass
class _Done:
    """A job's thread's last word to the main thread (which alone writes and commits runs)."""

    index: int
    result: RunResult | None = None
    error: BaseException | None = None
    seconds: float = 0.0


class _Job:
    """One job driven from a thread of this process: its placement group, its shards' actors, the merges."""

    def __init__(self, executor: RayExecutor, cluster: Cluster, index: int, job: Job, dataset: ConceptDataset,
                 shown: _Shown, started: Callable[[int], None], done: Callable[[_Done], None], token: str,
                 explainer: Callable[[Job], ExplainerChoice | None]) -> None:
        self.executor, self.cluster, self.index, self.job, self.dataset = executor, cluster, index, job, dataset
        self.explainer = explainer
        self.shown, self.started, self.done, self.token = shown, started, done, token
        self.actors: list[Any] = []
        self.group: Any = None
        self.lock = threading.Lock()
        self.stopped = False
        self.began = time.perf_counter()  # the job's own time starts when its shards do (not while it waits)

    def run(self) -> None:
        try:
            result = self.compute()
            self.done(_Done(self.index, result=result, seconds=time.perf_counter() - self.began))
        except BaseException as exc:  # the job's failure is its outcome
            log.debug("job %s failed on Ray", self.job.display, exc_info=True)
            self.done(_Done(self.index, error=exc, seconds=time.perf_counter() - self.began))
        finally:
            self.release()

    def compute(self) -> RunResult:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ... import __version__
        from ...core.partials import layer_results, merge_all, settle_thresholds, split_shards
        from ...core.types import RunResult

        job, total = self.job, len(self.dataset)
        explainer = self.explainer(job)  # before any worker starts: its parameters are checked here
        if total == 0:
            raise DissectionError("the concept dataset has no images")
        workers = job.workers if job.workers is not None else 0
        requested = self.executor.shards or self.cluster.default_shards(job.device, workers)
        shards = [s for s in split_shards(total, requested, job.batch_size) if len(s)]
        wanted = self.cluster.resources(job.device, len(shards), workers)
        # The worker's own view of the job: Ray shows it one GPU (cuda), and its loaders are its own.
        worker_job = dataclasses.replace(job, workers=workers,
                                         device="cuda" if job.device.startswith("cuda") else job.device)
        with self.lock:
            if self.stopped:
                raise Stopped
            self.group = placement_group([dict(wanted)] * len(shards), strategy="PACK",
                                         name=f"netdissection-{self.token}-job{self.index}")
        ray.get(self.group.ready())  # all shards at once, when the cluster has room for them
        self.began = time.perf_counter()
        self.started(self.index)
        remote = _remote_worker()
        threads = max(1, int(wanted["CPU"]) - workers)
        with self.lock:
            if self.stopped:
                raise Stopped
            self.actors = [remote.options(
                num_cpus=wanted["CPU"], num_gpus=wanted.get("GPU", 0.0), max_restarts=RESTARTS,
                max_task_retries=RESTARTS, name=f"netdissection-{self.token}-job{self.index}-shard{i}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            ).remote(worker_job, shard, total, threads, __version__) for i, shard in enumerate(shards)]
        sizes = [len(s) for s in shards]
        # The workers' start (a process each, the frameworks imported, the model built) apart from the passes.
        self.gather("__ray_ready__", (), "", sizes)
        seconds: dict[str, float] = {"workers": time.perf_counter() - self.began}

        begun = time.perf_counter()
        runtime = self.decide_runtime(sizes)
        activations = merge_all(self.gather("activation_pass", (runtime,), "activations", sizes))
        seconds["activations"] = time.perf_counter() - begun
        if activations.images == 0:
            raise DissectionError("no image of the concept dataset could be loaded")

        begun = time.perf_counter()

        def read(states: dict[str, ThresholdRule]) -> list[dict[str, ThresholdRule]]:
            return self.gather("threshold_round", (ray.put(states), runtime), "thresholds", sizes)

        thresholds = settle_thresholds(activations, read)
        seconds["thresholds"] = time.perf_counter() - begun

        begun = time.perf_counter()
        sent = ray.put(thresholds)  # for the IoU pass and every read of an explainer's
        counts = merge_all(self.gather("iou_pass", (sent, None, "IoU", runtime), "IoU", sizes))
        seconds["iou"] = time.perf_counter() - begun
        seconds["passes"] = seconds["activations"] + seconds["thresholds"] + seconds["iou"]

        results = layer_results(activations, thresholds, counts, self.dataset.vocabulary)
        if explainer is not None:
            from ...core.explain import run_explainer

            begun = time.perf_counter()

            def again(factory: Callable[..., Any], stage: str = "explain") -> Any:
                # Each read is the IoU pass again in every shard, into the explainer's accumulators (which
                # travel to the workers pickled), their partials merged here as a local run merges its shards'.
                return merge_all(self.gather("iou_pass", (sent, factory, stage, runtime), stage, sizes))

            for name, rows in run_explainer(explainer, results, again).items():
                results[name].explanations = list(rows)
            seconds["explain"] = time.perf_counter() - begun
        about = self.gather("about", (), "", sizes)
        self.gather("close", (), "", sizes)
        if job.bootstrap:
            from ...core.bootstrap import BootstrapSpec

            begun = time.perf_counter()
            BootstrapSpec(job.bootstrap, job.bootstrap_seed).attach(results, counts)
            seconds["bootstrap"] = time.perf_counter() - begun
        modules = about[0]["modules"]
        for name, result in results.items():
            result.seconds = dict(seconds)
            result.module = modules.get(name, name)
            for warning in result.warnings:
                log.warning("layer %s: %s", name, warning)
        provenance = dict(about[0]["provenance"])
        provenance["device"] = job.device
        provenance["executor"] = {
            "name": "ray", "shards": len(shards), "shard_images": sizes,
            "per_shard": dict(wanted), "torch_threads_per_shard": threads, "workers_per_shard": workers,
            "cluster": {k: v for k, v in self.cluster.info.items() if k not in ("node_cpus", "node_gpus")},
            "shard_nodes": [a["node"] for a in about],
            "restarted_shards": [i for i, a in enumerate(about) if a["restarted"]],
            # What each shard's backend ran on: under --runtime auto, what shard 0 decided on its first batch.
            "shard_runtimes": [(a["provenance"].get("backend_details") or {}).get("runtime") for a in about],
            **({"runtime_decided_by": "shard 0"} if runtime is not None else {}),
        }
        from ...core.skipped import skipped_samples

        return RunResult(layers=results, provenance=provenance, seconds=seconds, images=counts.images,
                         dataset=self.dataset, plugin_errors=[],
                         skipped=skipped_samples(self.dataset, activations.failures))  # --skip-bad, all shards

    def decide_runtime(self, sizes: Sequence[int]) -> dict[str, Any] | None:
        """Under ``--runtime auto`` on several shards: what the first shard's backend decides on its first batch
        (its ``describe()``), for every shard to run on; None when each shard runs what was asked for. Left to
        each shard, the choice could differ between them (it is timed), and the merged thresholds would then mix
        two runtimes' float rounding."""
        if len(self.actors) < 2 or (self.job.backend_options or {}).get("runtime") != "auto":
            return None
        return self.gather("decide_runtime", (), "", sizes, shards=[0])[0]

    def gather(self, method: str, args: tuple[Any, ...], shown: str, sizes: Sequence[int],
               shards: Sequence[int] | None = None) -> list[Any]:
        """Call ``method`` on every shard's worker (or those of ``shards``); their answers in shard order. The
        pass ``shown`` (if any) counts each shard's images as its answer arrives; a shard's error is raised as
        the error it is."""
        import ray

        actors = self.actors if shards is None else [self.actors[i] for i in shards]
        sizes = sizes if shards is None else [sizes[i] for i in shards]
        calls = [getattr(actor, method).remote(*args) for actor in actors]
        if shown:
            self.shown.show(self.index, lambda progress: progress.start(shown, sum(sizes)))
        waiting = {ref: i for i, ref in enumerate(calls)}
        try:
            while waiting:
                done, _ = ray.wait(list(waiting), num_returns=1)
                shard = waiting.pop(done[0])
                ray.get(done[0])  # an error now, not after the slower shards
                if shown:
                    self.shown.show(self.index, lambda progress: progress.advance(sizes[shard]))  # noqa: B023
            if shown:
                self.shown.show(self.index, lambda progress: progress.finish())
            return ray.get(calls)
        except ray.exceptions.RayTaskError as exc:  # the worker's own exception, not Ray's wrapper of it
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise cause from None
        except ray.exceptions.RayActorError as exc:
            raise DissectionError(f"a Ray worker of {self.job.display} died and was restarted {RESTARTS} times: "
                                  f"{first_line(exc)}") from None

    def release(self) -> None:
        """Kill the job's workers and free its placement group (also when it is stopped part way)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with self.lock:
            self.stopped = True
            actors, group, self.actors, self.group = self.actors, self.group, [], None
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                log.debug("killing a worker", exc_info=True)
        if group is not None:
            try:
                remove_placement_group(group)
            except Exception:
                log.debug("removing a placement group", exc_info=True)


class RayExecutor:
    """Runs each job's shards in Ray actors and merges them here; see the module docstring."""

    name = "ray"

    def __init__(self, address: str | None = None, shards: int | None = None, **options: Any) -> None:
        refuse_options({k: v for k, v in options.items() if v is not None}, "the ray executor")
        if shards is not None and shards < 1:
            raise DissectionError(f"--shards must be at least 1, not {shards}")
        import_ray()
        # Like Ray's own tools, $RAY_ADDRESS names the cluster when --address does not.
        self.address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
        if self.address is not None:
            check_reachable(self.address)
        self.shards = shards

    def run(self, jobs: Sequence[Job], context: JobContext) -> Iterator[JobOutcome]:
        from ...core.execution import FAILED, JobOutcome, one_line

        pending = []
        for index, job in enumerate(jobs):
            started = time.perf_counter()
            try:
                found = context.lookup(index, job)
            except Exception as exc:
                found = JobOutcome(index, job, FAILED, key=context.known_key(job), error=one_line(exc))
            if found is None:
                pending.append(index)
                continue
            context.events.job_started(index, job, len(jobs))
            found.seconds = time.perf_counter() - started
            context.events.job_finished(found)
            yield found
        if pending:
            with Cluster(self.address) as cluster:
                yield from self._run_on(cluster, jobs, pending, context)

    def _run_on(self, cluster: Cluster, jobs: Sequence[Job], pending: Sequence[int],
                context: JobContext) -> Iterator[JobOutcome]:
        """Every pending job in a thread of its own (Ray runs them as the cluster has room); here, in the
        caller's thread, each job is announced when its shards start, and written and committed when done."""
        token = secrets.token_hex(4)
        shown = _Shown()
        started: queue.Queue[int] = queue.Queue()
        finished: queue.Queue[_Done] = queue.Queue()
        ready = {index: threading.Event() for index in pending}

        def job_started(index: int) -> None:  # in a job's thread: wait for the progress to show its passes on
            started.put(index)
            while not ready[index].wait(0.5):
                if drivers[index].stopped:
                    raise Stopped

        drivers = {index: _Job(self, cluster, index, jobs[index], context.dataset(jobs[index]), shown,
                               job_started, finished.put, token, context.explainer) for index in pending}
        for driver in drivers.values():
            threading.Thread(target=driver.run, name=f"ray-job-{driver.index}", daemon=True).start()
        announced: set[int] = set()
        remaining = len(drivers)
        try:
            while remaining:
                try:
                    index = started.get_nowait()
                    with shown.lock:
                        shown.progress = context.events.job_started(index, jobs[index], len(jobs))
                        shown.current = index
                    announced.add(index)
                    ready[index].set()
                    continue
                except queue.Empty:
                    pass
                try:
                    done = finished.get(timeout=0.1)
                except queue.Empty:
                    continue
                remaining -= 1
                index = done.index
                with shown.lock:
                    if index not in announced:  # it failed before its shards started
                        context.events.job_started(index, jobs[index], len(jobs))
                    if shown.current == index:
                        shown.current = shown.progress = None
                outcome = self._outcome(index, jobs[index], done, context)
                with shown.lock:
                    context.events.job_finished(outcome)
                yield outcome
        finally:
            for driver in drivers.values():
                driver.release()

    @staticmethod
    def _outcome(index: int, job: Job, message: _Done, context: JobContext) -> JobOutcome:
        """Write a merged run's reports and commit it to the store as a local run is; a failure is its outcome."""
        from ...core.execution import FAILED, JobOutcome, one_line

        started = time.perf_counter()
        if message.error is not None or message.result is None:
            return JobOutcome(index, job, FAILED, key=context.known_key(job),
                              error=one_line(message.error or RuntimeError("no result")), seconds=message.seconds)
        result = message.result
        try:
            run_dir, staging = context.begin(index, job)
        except Exception as exc:
            return JobOutcome(index, job, FAILED, key=context.known_key(job), error=one_line(exc),
                              seconds=message.seconds)
        try:
            context.write_result(job, result, run_dir)
            result.seconds["reports"] = time.perf_counter() - started
            return context.finish(index, job, run_dir, staging, result,
                                  message.seconds + time.perf_counter() - started)
        except BaseException as exc:
            context.abandon(index, job, run_dir, staging)
            if not isinstance(exc, Exception):
                raise
            log.debug("%s failed", job.display, exc_info=True)
            return JobOutcome(index, job, FAILED, key=context.known_key(job), error=one_line(exc),
                              seconds=message.seconds + time.perf_counter() - started)


@hookimpl
def dissect_register_executors(register) -> None:  # type: ignore[no-untyped-def]
    register("ray", RayExecutor, requires=("ray",),
             description="(model, dataset shard) jobs in Ray actors, merged exactly: --shards N, --address HOST:PORT "
                         f"(without it, a local Ray instance); needs: {INSTALL}")
