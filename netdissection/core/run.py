"""One dissection on components already chosen: check the layers, run the passes, save the results, run the
report writers.

The core knows no plugin host: the caller (``netdissection.api``) resolves every component by name before
anything runs, hands the objects over, and relays the lifecycle :class:`RunEvents` to the plugins' hooks.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import malloc
from .errors import DissectionError, UnknownNameError
from .explain import ExplainerChoice, check_explainer, check_units, run_explainer
from .locks import locks_folder
from .protocols import Backend, ConceptDataset, ReportWriter, ThresholdRule
from .types import InputSpec, LayerInfo, LayerResult, RunResult, SkippedSample
from .version import __version__

if TYPE_CHECKING:  # the scheduler imports torch: only a run needs it
    from .loading import Batch
    from .rotation import Rotation
    from .scheduler import Plan, Progress

log = logging.getLogger(__name__)

COMPAT_MODES = ("paper", "lite")


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold rule of a run.

    Each layer's rule is ``factory(units, values_per_unit, **kwargs)``; ``params`` is what provenance
    records as the rule's parameters (the values it runs with, defaults included).
    """

    name: str
    factory: Callable[..., ThresholdRule]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    plugin: str = ""

    def make(self, units: int, values_per_unit: int) -> ThresholdRule:
        return self.factory(units, values_per_unit, **self.kwargs)


@dataclass(frozen=True)
class WriterChoice:
    """A report writer a run uses: its name, the object, and the plugin that registered it."""

    name: str
    writer: ReportWriter
    plugin: str = ""


#: ``chooser(layer infos, model name, select) -> names``: picks a run's layers from the model's own list;
#: ``select(requested)`` applies the backend's checks and default to names (None: the default layer).
LayerChooser = Callable[[list[LayerInfo], str, Callable[[Sequence[str] | None], list[str]]], list[str]]


class RunEvents(Protocol):
    """What a run tells its caller, in this order: ``run_start``, ``layer_start`` per layer, ``layer_finish``
    per layer, ``run_finish`` (after the results and reports are written) — or ``run_error`` when it stops.

    ``writer_failed`` is called when a report writer raises; the run goes on without its files unless the
    method raises. ``failures`` lists every plugin failure so far, as saved in ``summary.json``.
    """

    def run_start(self, run: dict[str, Any]) -> None: ...

    def layer_start(self, run: dict[str, Any], layer: str) -> None: ...

    def layer_finish(self, run: dict[str, Any], result: LayerResult) -> None: ...

    def run_finish(self, run: dict[str, Any], result: RunResult) -> None: ...

    def run_error(self, run: dict[str, Any], error: BaseException) -> None: ...

    def writer_failed(self, writer: WriterChoice, error: Exception) -> None: ...

    def failures(self) -> list[dict[str, str]]: ...


class QuietEvents:
    """Events for a run without a host: nothing listens; a failing writer is logged and recorded."""

    def __init__(self) -> None:
        self._failures: list[dict[str, str]] = []

    def run_start(self, run: dict[str, Any]) -> None:
        pass

    def layer_start(self, run: dict[str, Any], layer: str) -> None:
        pass

    def layer_finish(self, run: dict[str, Any], result: LayerResult) -> None:
        pass

    def run_finish(self, run: dict[str, Any], result: RunResult) -> None:
        pass

    def run_error(self, run: dict[str, Any], error: BaseException) -> None:
        pass

    def writer_failed(self, writer: WriterChoice, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        log.warning("report writer %r failed: %s", writer.name, message)
        self._failures.append({"plugin": writer.plugin, "where": f"report writer {writer.name!r}",
                               "error": message})

    def failures(self) -> list[dict[str, str]]:
        return list(self._failures)


def check_options(*, compat: str, batch_size: int, device: str, cache: str = "auto",
                  cache_budget: str | int | None = None, bootstrap: int = 0, bootstrap_seed: int = 0,
                  workers: int | None = None) -> None:
    """The run options every backend and dataset share, checked before anything is built."""
    from .bootstrap import check_bootstrap
    from .cache import CACHE_MODES, parse_size

    check_bootstrap(bootstrap, bootstrap_seed)
    if cache not in CACHE_MODES:
        raise DissectionError(f"--cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    parse_size(cache_budget)
    if compat not in COMPAT_MODES:
        raise DissectionError(f"--compat must be one of {', '.join(COMPAT_MODES)}, not {compat!r}")
    if batch_size < 1:
        raise DissectionError(f"--batch-size must be at least 1, not {batch_size}")
    if workers is not None and workers < 0:
        raise DissectionError(f"--workers must be 0 or more (0: decode in this process), not {workers}")
    if device == "cpu":
        return
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DissectionError(f"--device {device}: no CUDA device is available here; use --device cpu")
        return
    raise DissectionError(f"--device must be cpu or cuda[:N], not {device!r}")


def check_layers(infos: list[LayerInfo], requested: Sequence[str] | None, model_name: str) -> list[str]:
    """The requested layers, checked; with none, the last layer with a spatial map."""
    by_name = {i.name: i for i in infos}
    if not requested:
        spatial = [i for i in infos if i.spatial]
        if not spatial:
            raise DissectionError(f"{model_name} has no layer with a spatial map to dissect")
        return [spatial[-1].name]
    layers = []
    for name in requested:
        info = by_name.get(name)
        if info is None:
            raise UnknownNameError(f"layer of {model_name}", name, list(by_name),
                                   hint=f"list them with: dissect layers {model_name}")
        if not info.spatial:
            raise DissectionError(f"layer {name!r} of {model_name} has no spatial map (output shape "
                                  f"{tuple(info.shape)}); pick a layer listed as conv or tokens by "
                                  f"'dissect layers {model_name}'")
        if name not in layers:
            layers.append(name)
    return layers


@dataclass
class PreparedRun:
    """A run ready for its passes: the plan (components, layers, options), the input spec, the provenance
    and each layer's resolved module. :func:`run_dissection` runs it in this process; an executor that runs
    the passes elsewhere prepares the very same run in each worker (``netdissection.prepare_job``)."""

    plan: Plan
    spec: InputSpec
    provenance: dict[str, Any]
    modules: dict[str, str]  # layer as requested -> the module it resolved to (stage:-1 -> stages.3)


def prepare_run(
    backend: Backend,
    dataset: ConceptDataset,
    threshold: ThresholdChoice,
    *,
    backend_name: str,
    model_ref: Any = None,
    layers: Sequence[str] | LayerChooser | None = None,
    compat: str = "paper",
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    top_k: int = 10,
    skip_bad: bool = False,
    cache: str = "auto",
    cache_budget: str | int | None = None,
    plugins: Mapping[str, str] | None = None,
    work_dir: str | Path | None = None,
    rotation: Rotation | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    explainer: ExplainerChoice | None = None,
    started: Generator[Batch, None, None] | None = None,
) -> PreparedRun:
    """Check the options, choose the layers, and build the plan and provenance of a run (no pass runs).
    ``work_dir``: where the activation cache goes (default: the temporary folder). ``rotation`` reads every
    dissected layer's units in a rotated basis (``core/rotation.py``). ``bootstrap`` resamples (0: none)
    with ``bootstrap_seed`` give each unit and count an interval (``core/bootstrap.py``). ``explainer``:
    labels units otherwise too, after the IoU pass (``core.explain``). ``started``: the activation pass's
    batches, their decoding already under way (``scheduler.first_pass_batches``)."""
    from .bootstrap import BootstrapSpec
    from .cache import parse_size
    from .loading import default_workers
    from .scheduler import LITE_INPUT, Plan

    check_options(compat=compat, batch_size=batch_size, device=device, cache=cache, cache_budget=cache_budget,
                  bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, workers=workers)
    budget = parse_size(cache_budget)
    resampling = BootstrapSpec(bootstrap, bootstrap_seed) if bootstrap else None
    description = backend.describe()
    model_name = str(description.get("model", model_ref))
    infos = backend.layers()
    own = getattr(backend, "select_layers", None)  # a backend may choose its default and explain refusals

    def select(requested: Sequence[str] | None) -> list[str]:
        return list(own(requested)) if own is not None else check_layers(infos, requested, model_name)

    # A callable chooses from the model's layers (``dissect compare``: stage:*, where it exists) and hands
    # its choice to ``select`` for the backend's checks and default.
    layer_names = layers(infos, model_name, select) if callable(layers) else select(layers)
    resolved = {i.name: i.module or i.name for i in infos}  # stage:-1 → stages.3

    spec = backend.input_spec()
    if compat == "lite":
        spec = replace(spec, mean=LITE_INPUT.mean, std=LITE_INPUT.std)
    provenance: dict[str, Any] = {
        "netdissection": __version__,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "backend": backend_name,
        "backend_details": description,
        "dataset": dataset.describe(),
        "layers": layer_names,
        "threshold_rule": {"name": threshold.name, "plugin": threshold.plugin, "params": dict(threshold.params)},
        "semantics": compat,
        "input": {"mean": list(spec.mean), "std": list(spec.std), "channel_order": spec.channel_order},
        "device": device,
        "batch_size": batch_size,
        "plugins": dict(plugins or {}),
        "python": platform.python_version(),
    }
    if resampling is not None:
        provenance["bootstrap"] = resampling.provenance(len(dataset))
    transforms: dict[str, Any] = {}
    if rotation is not None:
        from .rotation import rotation_transforms

        transforms, provenance["rotation"] = rotation_transforms(rotation, infos, layer_names, resolved)
    if explainer is not None:
        # Before anything runs: the units exist in every layer, the explainer knows the concepts it names.
        sizes = {i.name: i.units for i in infos if i.name in layer_names and i.shape}
        check_units(explainer.units, sizes)
        check_explainer(explainer, dataset.vocabulary)
        provenance["explainer"] = explainer.record()
    plan = Plan(backend=backend, dataset=dataset, layers=layer_names, make_rule=threshold.make, semantics=compat,
                batch_size=batch_size, workers=default_workers() if workers is None else workers, device=device,
                top_k=top_k, skip_bad=skip_bad, work_dir=Path(work_dir) if work_dir is not None else None,
                cache=cache, cache_budget=budget, transforms=transforms, bootstrap=resampling,
                explain=(lambda results, read: run_explainer(explainer, results, read)) if explainer else None,
                started=started)
    return PreparedRun(plan, spec, provenance, resolved)


@locks_folder("out")  # one run at a time writes into an output folder (core/locks.py)
def run_dissection(
    backend: Backend,
    dataset: ConceptDataset,
    threshold: ThresholdChoice,
    *,
    backend_name: str,
    model_ref: Any = None,
    layers: Sequence[str] | LayerChooser | None = None,
    writers: Sequence[WriterChoice] = (),
    compat: str = "paper",
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    top_k: int = 10,
    skip_bad: bool = False,
    progress: Progress | None = None,
    cache: str = "auto",
    cache_budget: str | int | None = None,
    events: RunEvents | None = None,
    plugins: Mapping[str, str] | None = None,
    rotation: Rotation | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    explainer: ExplainerChoice | None = None,
    started: Generator[Batch, None, None] | None = None,
) -> RunResult:
    """Dissect the model behind ``backend`` on ``dataset``: both passes for every layer at once, then (with
    ``out``) the saved counts and ``summary.json``, then each writer, then ``summary.json`` again with every
    file written. ``plugins`` (name → version) goes into the provenance. ``cache`` ("auto", "disk",
    "recompute") and ``cache_budget`` (bytes, or a size like "20G") say where the reads after the first pass
    get the maps. ``rotation`` reads every dissected layer's units in a rotated basis (``core/rotation.py``).
    ``bootstrap`` resamples (0: none) with ``bootstrap_seed`` give each unit and count an interval
    (``core/bootstrap.py``). ``explainer``: labels units otherwise too, after the IoU pass (``core.explain``).
    ``started``: the activation pass's batches, their decoding already under way (see ``api.dissect``)."""
    from .reporting import rewrite_summary, write_results
    from .scheduler import run_passes

    prepared = prepare_run(backend, dataset, threshold, backend_name=backend_name, model_ref=model_ref, layers=layers,
                           compat=compat, batch_size=batch_size, device=device, workers=workers, top_k=top_k,
                           skip_bad=skip_bad, cache=cache, cache_budget=cache_budget, plugins=plugins, work_dir=out,
                           rotation=rotation, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
                           explainer=explainer, started=started)
    plan, spec, provenance, resolved = prepared.plan, prepared.spec, prepared.provenance, prepared.modules
    events = events if events is not None else QuietEvents()
    events.run_start(provenance)
    for name in plan.layers:
        events.layer_start(provenance, name)
    started = time.perf_counter()
    try:
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
        skipped: list[SkippedSample] = []
        layer_results, images, seconds = run_passes(plan, spec, progress, skipped=skipped)
        # Asked again: a backend records what it decided on the first batches (the runtime auto chose).
        provenance["backend_details"] = backend.describe()
        for layer_result in layer_results.values():
            layer_result.seconds = dict(seconds)
            layer_result.module = resolved.get(layer_result.layer, layer_result.layer)
            events.layer_finish(provenance, layer_result)
        seconds["passes"] = time.perf_counter() - started
        result = RunResult(layers=layer_results, provenance=provenance, seconds=seconds, images=images,
                           dataset=dataset, plugin_errors=events.failures(), skipped=skipped)
        if out is not None:
            started = time.perf_counter()
            malloc.batches_done()  # the reports grow from the memory in use, not from the passes' peak
            write_results(result, Path(out), writers, events)
            seconds["reports"] = time.perf_counter() - started
    except BaseException as exc:
        events.run_error(provenance, exc)
        raise
    events.run_finish(provenance, result)
    failures = events.failures()
    if failures != result.plugin_errors:  # a run-finish hook failed: say so in the saved summary too
        result.plugin_errors = failures
        if out is not None:
            rewrite_summary(result, Path(out))
    return result
