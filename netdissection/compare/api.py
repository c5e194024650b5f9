"""``netdissection.compare``: many dissections, one comparison table.

Each model (with its weights and layers) is one job; jobs already in the results store are read, not
computed; the others run on the chosen executor (``local``: one after another in this process). A job
that fails is a ``failed`` row with its one-line error and the others go on.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import DissectionError
from ..core.execution import FAILED, JobEvents, JobOutcome
from ..core.files import layer_dirnames
from ..core.jobkey import Job
from ..core.locks import locks_folder
from ..core.store import ResultsStore
from .execution import ExecutionContext
from .rows import failed_row, rows_from_summary, tally_row
from .specs import CheckpointSeries, ModelSpec, expand, parse_label, read_models_file, with_series

log = logging.getLogger(__name__)

COMPAT_MODES = ("paper", "lite")
RUNS = "runs"
#: Default report writers left out of each run of a comparison (``reporters=`` brings them back): the
#: comparison's own plots cover them, and matplotlib's ~0.3 s a figure, three figures a layer, would be
#: most of a small model's time.
SKIPPED_BY_DEFAULT = ("plots",)


class CompareTable(list):  # type: ignore[type-arg]
    """The comparison: a list of rows (dicts), one per (model, layer), plus published tallies.

    ``out`` is the folder the files were written to (None when none were asked for); ``outcomes`` holds
    what became of each job (computed, from the store, failed).
    """

    def __init__(self, rows: Iterable[dict[str, Any]], out: Path | None = None,
                 outcomes: Sequence[JobOutcome] = ()) -> None:
        super().__init__(rows)
        self.out = out
        self.outcomes = list(outcomes)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self if r.get("status") == FAILED]

    def to_pandas(self) -> Any:
        """The rows as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise DissectionError("to_pandas() needs pandas; install it with: pip install pandas") from None
        from .rows import columns

        return pd.DataFrame(list(self), columns=columns(self))


@locks_folder("out")  # one comparison at a time writes into OUT (core/locks.py)
def compare(
    models: str | Sequence[str] = (),
    *,
    models_file: str | Path | None = None,
    exclude: Sequence[str] = (),
    checkpoints: Sequence[str] | Sequence[CheckpointSeries] = (),
    x_from: str | None = None,
    layers: Sequence[str] = (),
    labels: Mapping[str, str] | Sequence[str] | None = None,
    add_tallies: Mapping[str, str | Path] | Sequence[str] | None = None,
    out: str | Path | None = None,
    store: bool | str | Path | None = True,
    executor: str = "local",
    executor_options: Mapping[str, Any] | None = None,
    backend: str | None = None,
    pretrained: bool = False,
    dataset: str | Path | None = None,
    dataset_format: str | None = None,
    categories: Sequence[str] | None = None,
    threshold: str | None = None,
    threshold_params: Mapping[str, Any] | None = None,
    quantile: float | None = None,
    compat: str = "paper",
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    top_k: int = 10,
    reporters: Sequence[str] | None = None,
    plot_formats: Sequence[str] = (),
    skip_bad: bool = False,
    cache: str = "auto",
    cache_budget: str | int | None = None,
    backend_options: Mapping[str, Any] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    events: JobEvents | None = None,
    host: Any = None,
    strict_plugins: bool | None = None,
    rotate: float | Sequence[float] | None = None,
    rotate_seed: int = 0,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    explain: str | None = None,
    explain_params: Mapping[str, Any] | None = None,
    explain_units: Sequence[int] | str | None = None,
) -> CompareTable:
    """Dissect every model and compare them; returns the table (and writes it to ``out`` if given).

    ``models``: names, files and globs (``"timm:convnext_*"``, ``"models/*.onnx"``); ``models_file``: one
    ``MODEL [--weights FILE] [--layer L]... [--label K=V]... [--checkpoints GLOBS]`` per line; ``checkpoints``:
    globs of one architecture's checkpoints (and ``"random"``), or several :class:`CheckpointSeries` (each with
    the labels that name its group), x read from each name or by ``x_from``; ``layers``:
    applied to each model where it exists (``"stage:-1"``, ``"stage:*"``; default: the model's default);
    ``labels``: ``{"dropout": "0.5"}`` for every model; ``add_tallies``: ``{name: path}`` of published
    ``tally.csv`` files. ``store``: True for the default results store, a folder, or False for none.
    ``executor``: ``"local"`` (the jobs one after another here) or another executor plugin, e.g. ``"ray"`` with
    ``executor_options={"address": "HOST:PORT", "shards": 4}`` (without an address: a local Ray instance).
    ``rotate``: one α or several (``[0, 0.2, ..., 1]``): every model is dissected once per α with its units
    read in the rotated basis Q^α (Q drawn from ``rotate_seed``; see ``netdissection.dissect``).
    ``plot_formats``: ``["png", "pdf"]`` for copies of every run's plots beside their SVG (the runs then draw
    their plots, which a comparison leaves out by default). ``explain``: an explainer that also labels every
    run's units (``"compositional"``: formulas of concepts; ``explain_params``, ``explain_units`` as for
    :func:`netdissection.dissect`), its rows in each run's ``<layer>/explanations.csv``.
    The other options are those of :func:`netdissection.dissect`, the same for every model.
    """
    from ..api import build_host, check_run
    from ..core.explain import parse_units

    host = host or build_host()
    units = parse_units(explain_units)
    # Every option and name before any model is looked for: a typo fails at once.
    rule, _ = check_run(host, backend=backend, dataset_format=dataset_format, threshold=threshold,
                        threshold_params=threshold_params, quantile=quantile, compat=compat, batch_size=batch_size,
                        device=device, cache=cache, cache_budget=cache_budget, reporters=reporters, make_rule=False,
                        bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, explain=explain,
                        explain_params=explain_params, explain_units=units, workers=workers)
    alphas = _alphas(rotate, rotate_seed)
    runner = make_executor(host, executor, executor_options)
    tallies = _tallies(add_tallies)
    common = _labels(labels)
    specs = model_specs([models] if isinstance(models, str) else list(models), models_file, exclude, checkpoints,
                        x_from, host)
    if not specs and not tallies:
        raise DissectionError("nothing to compare: name models (dissect compare MODEL ...), --models, "
                              "--models-file, or --add-tally")
    if not reporters:  # copies of the runs' plots asked for: the runs draw their plots
        skipped = () if plot_formats else SKIPPED_BY_DEFAULT
        reporters = [e.name for e in host.catalog("reporter") if e.metadata.get("default", False)
                     and e.name not in skipped]
    jobs = [Job(model=s.model, backend=s.backend or backend, weights=s.weights, pretrained=pretrained,
                layers=tuple(s.layers or layers), lenient_layers=True,
                dataset=str(dataset) if dataset is not None else None, dataset_format=dataset_format,
                categories=tuple(categories) if categories else None,
                dataset_options={k: v for k, v in (dataset_options or {}).items() if v is not None},
                threshold=threshold, threshold_params=dict(threshold_params or {}), quantile=quantile,
                compat=compat, top_k=top_k, skip_bad=skip_bad,
                backend_options={k: v for k, v in (backend_options or {}).items() if v is not None},
                device=device, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, batch_size=batch_size,
                workers=workers, reporters=tuple(reporters) if reporters else None, plot_formats=tuple(plot_formats),
                cache=cache, cache_budget=cache_budget, name=s.name or _display(s), x=s.x,
                labels={**common, **s.labels}, rotate=alpha, rotate_seed=rotate_seed if alpha is not None else 0,
                explain=explain, explain_params=dict(explain_params or {}), explain_units=units)
            for s in specs for alpha in alphas]
    results_store = None if store is False or store is None else ResultsStore(None if store is True else store)
    out_dir = Path(out) if out is not None else None
    with tempfile.TemporaryDirectory(prefix="netdissection-compare-") as scratch:
        # Without a store and without OUT, runs go to a scratch folder for as long as the rows are read.
        runs = (out_dir if out_dir is not None else Path(scratch)) / RUNS
        names = run_folders([_folder(job) for job in jobs])
        placed: set[int] = set()

        def place(index: int, job: Job) -> Path | None:
            if out_dir is None and results_store is not None:
                return None  # the store keeps the runs; no copy asked for
            folder = runs / names[index]
            if index not in placed:  # OUT/runs is the comparison's own: no file of an earlier one lingers
                placed.add(index)
                shutil.rmtree(folder, ignore_errors=True)
            return folder

        context = ExecutionContext(host, results_store, place=place, events=events, strict_plugins=strict_plugins,
                                   complete_reports=True)
        preflight(jobs, context)
        outcomes = sorted(runner.run(jobs, context), key=lambda o: o.index)
        rows = [row for outcome in outcomes for row in outcome_rows(outcome, out_dir)]
    rows += [tally_row(name, path) for name, path in tallies]
    if out_dir is not None:
        from .outputs import write_outputs

        write_outputs(rows, out_dir, about(outcomes, executor, results_store,
                                           {"name": rule.name, "params": dict(rule.params)}, compat))
    return CompareTable(rows, out_dir, outcomes)


def model_specs(models: Sequence[str], models_file: str | Path | None, exclude: Sequence[str],
                checkpoints: Sequence[str] | Sequence[CheckpointSeries], x_from: str | None,
                host: Any) -> list[ModelSpec]:
    specs = [ModelSpec(model=m) for m in models]
    if models_file is not None:
        specs += read_models_file(models_file)
    specs = expand(specs, host, exclude) if specs else []
    return with_series(specs, checkpoints, x_from)


def make_executor(host: Any, name: str, options: Mapping[str, Any] | None) -> Any:
    """The executor plugin ``name`` made with ``options``; unknown names fail with close matches."""
    entry = host.catalog("executor").get(name)
    return entry.factory(**{k: v for k, v in (options or {}).items() if v is not None})


def preflight(jobs: Sequence[Job], context: ExecutionContext) -> None:
    """Catch bad input before any job runs (one line, exit 2): model names no backend knows, checkpoints
    of a series that do not fit its architecture. Jobs already in the store are not checked: a comparison
    read from the store starts no framework."""
    pending = [job for job in jobs if context.stored(job) is None]
    if not pending:
        return
    from ..api import resolve_backend

    for job in pending:
        context.dataset(job)  # a missing folder or an unknown category; opened once, kept for the run

    for model, backend in dict.fromkeys((job.model, job.backend) for job in pending):
        resolve_backend(context.host, model, backend)
    # Each architecture's checkpoints, loaded into one instance of it (several series may share one).
    series: dict[tuple[Any, ...], list[Job]] = {}
    for job in pending:
        if job.x is not None and job.weights:
            ident = (job.model, job.backend, tuple(sorted((k, str(v)) for k, v in job.backend_options.items())))
            series.setdefault(ident, []).append(job)
    for members in series.values():
        check_checkpoints(context.host, members[0], list(dict.fromkeys(job.weights for job in members if job.weights)))


def check_checkpoints(host: Any, job: Job, weights: Sequence[str]) -> None:
    """Load every checkpoint of a series into one instance of its architecture: a file that does not fit
    fails now, named, instead of as a failed row after the others ran."""
    from ..api import make_backend
    from ..core.types import BackendOptions

    _, model_backend = make_backend(host, job.model, job.backend,
                                    BackendOptions(device="cpu", **dict(job.backend_options)))
    module = getattr(model_backend, "model", None)
    try:
        import torch

        from ..plugins.backends.torch_common import load_weights
    except ImportError:  # pragma: no cover - a series needs a torch backend anyway
        return
    if not isinstance(module, torch.nn.Module):
        return
    for file in weights:
        load_weights(module, file, job.model)


def outcome_rows(outcome: JobOutcome, out: Path | None) -> list[dict[str, Any]]:
    job = outcome.job
    if outcome.status == FAILED or outcome.summary is None:
        return [failed_row(job.display, outcome.error or "no result", backend=job.backend, weights=job.weights,
                           x=job.x, labels=job.labels, layers=job.layers, key=outcome.key, rotate=job.rotate,
                           rotate_seed=job.rotate_seed)]
    run = None
    if outcome.out_dir is not None and out is not None:
        try:
            run = outcome.out_dir.relative_to(out).as_posix()
        except ValueError:
            run = str(outcome.out_dir)
    return rows_from_summary(outcome.summary, model=job.display, x=job.x, labels=job.labels, weights=job.weights,
                             cached=outcome.cached, key=outcome.key, run=run, run_dir=outcome.run_dir)


def about(outcomes: Sequence[JobOutcome], executor: str, store: ResultsStore | None, rule: Mapping[str, Any],
          compat: str) -> dict[str, Any]:
    from .. import __version__

    dataset: dict[str, Any] = {}
    for outcome in outcomes:
        if outcome.summary:
            described = (outcome.summary.get("provenance") or {}).get("dataset") or {}
            dataset = {k: described.get(k) for k in ("format", "path", "images", "categories")}
            break
    return {"netdissection": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dataset": dataset, "threshold_rule": dict(rule), "semantics": compat,
            "executor": executor, "store": str(store.root) if store is not None else None,
            "jobs": {"total": len(outcomes), "from_store": sum(o.cached for o in outcomes),
                     "failed": sum(o.status == FAILED for o in outcomes)}}


def run_folders(displays: Sequence[str]) -> list[str]:
    """A folder name per job under OUT/runs: the display name made safe for paths, numbered on collision."""
    used: set[str] = set()
    names = []
    for display in displays:
        base = layer_dirnames([display])[display]
        name, i = base, 2
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        names.append(name)
    return names


def _folder(job: Job) -> str:
    """A job's run folder name before it is made safe: its display name, and its rotation."""
    return job.display if job.rotate is None else f"{job.display} rotate {job.rotate:g}"


def _alphas(rotate: float | Sequence[float] | None, seed: int) -> list[float | None]:
    """The α of each job of a model (``[None]``: no rotation), checked."""
    from ..core.rotation import check_rotation

    if rotate is None:
        check_rotation(None, seed)
        return [None]
    values = [rotate] if isinstance(rotate, int | float | str) else list(rotate)
    if not values:
        raise DissectionError("--rotate names no α; give one or more, e.g. --rotate 0,0.5,1")
    alphas: list[float | None] = []
    for value in values:
        rotation = check_rotation(value, seed)
        if rotation is not None and rotation.alpha not in alphas:
            alphas.append(rotation.alpha)
    return alphas


def _display(spec: ModelSpec) -> str:
    path = Path(spec.model)
    name = path.name if path.suffix and path.exists() else spec.model
    if spec.weights and spec.x is None:
        name = f"{name}@{Path(spec.weights).name}"
    return name


def _labels(labels: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {str(k): str(v) for k, v in labels.items()}
    return dict(parse_label(text) for text in labels)


def _tallies(tallies: Mapping[str, str | Path] | Sequence[str] | None) -> list[tuple[str, Path]]:
    if not tallies:
        return []
    pairs = (list(tallies.items()) if isinstance(tallies, Mapping)
             else [parse_label(text, "--add-tally") for text in tallies])
    found = []
    for name, path in pairs:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DissectionError(f"--add-tally {name}={path}: no such file")
        try:
            tally_row(name, file)
        except (KeyError, ValueError, OSError) as exc:
            raise DissectionError(f"--add-tally {name}={path} is not a NetDissect tally.csv ({exc})") from None
        found.append((name, file))
    return found
