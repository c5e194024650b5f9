"""Running jobs through the results store: the host's side of the executor contract
(``netdissection.core.execution``), and ``dissect MODEL`` through the store.

A run is written to ``<staging>/run`` (summary.json last), the staging folder renamed to the job's key
in one step; the user's copy (``--out``, or ``OUT/runs/<name>`` of a comparison) is linked from there.
"""


from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.execution import OK, JobEvents, JobOutcome, SilentEvents, execute
from ..core.jobkey import Job, NotStorable, key_material, key_of
from ..core.store import RUN, ResultsStore, StoredJob, materialise

if TYPE_CHECKING:  # pragma: no cover
    from ..core.explain import ExplainerChoice
    from ..core.run import PreparedRun
    from ..core.scheduler import Progress
    from ..core.types import RunResult

log = logging.getLogger(__name__)


class ExecutionContext:
    """What every job of a run shares: the plugin host, the store, where runs are placed, the datasets.

    ``place(index, job)`` names the folder the user gets each run in (None: only the store keeps it);
    ``complete_reports``: a run placed there from the store gets the reports the job asks for that the stored
    run lacks.
    """

    def __init__(self, host: Any, store: ResultsStore | None, *,
                 place: Callable[[int, Job], Path | None] | None = None, events: JobEvents | None = None,
                 strict_plugins: bool | None = None, complete_reports: bool = False) -> None:
        self.host = host
        self.store = store
        self.strict_plugins = strict_plugins
        self.complete_reports = complete_reports
        self.place = place or (lambda index, job: None)
        self.events: JobEvents = events or SilentEvents()
        # By id(job): a job's mappings make it unhashable; the job is kept beside its key so the id stays its own.
        self._keys: dict[int, tuple[Job, tuple[str, dict[str, Any]] | None]] = {}
        self._found: dict[str, StoredJob | None] = {}
        self._datasets: dict[tuple[Any, ...], Any] = {}

    # ---- keys and the store ---------------------------------------------------------------------------------

    def key(self, job: Job) -> tuple[str, dict[str, Any]] | None:
        """The job's key and its material; None without a store or for a job that cannot be keyed."""
        if self.store is None:
            return None
        if id(job) not in self._keys:
            try:
                material = key_material(job, self.host, self.rule(job), self.store.memo)
                self._keys[id(job)] = (job, (key_of(material), material))
            except NotStorable as exc:
                log.debug("%s: %s; it runs without the store", job.display, exc)
                self._keys[id(job)] = (job, None)
            finally:
                self.store.memo.save()
        return self._keys[id(job)][1]

    def rule(self, job: Job) -> dict[str, Any]:
        """The job's threshold rule as its run records it: ``{"name", "plugin", "params"}``, defaults included."""
        from ..api import choose_threshold

        choice = choose_threshold(self.host, job.threshold, job.threshold_params, quantile=job.quantile,
                                  compat=job.compat, device=job.device, make=False)
        return {"name": choice.name, "plugin": choice.plugin, "params": dict(choice.params)}

    def known_key(self, job: Job) -> str | None:
        """The job's key if it was computed already (never raises)."""
        keyed = self._keys.get(id(job), (job, None))[1]
        return keyed[0] if keyed else None

    def stored(self, job: Job) -> StoredJob | None:
        """The job's finished entry in the store (checked once per run), or None."""
        keyed = self.key(job)
        if keyed is None or self.store is None:
            return None
        key = keyed[0]
        if key not in self._found:
            self._found[key] = self.store.lookup(key)
        entry = self._found[key]
        if entry is not None and not job.lenient_layers and not _has_layers(entry, job.layers):
            return None  # a comparison skipped a layer this model lacks; dissecting it says which
        return entry

    def lookup(self, index: int, job: Job) -> JobOutcome | None:
        """The outcome of a job already in the store (placed where the user asked), or None."""
        entry = self.stored(job)
        if entry is None:
            return None
        out = self.place(index, job)
        summary = entry.summary()
        if out is not None:
            materialise(entry.run_dir, out)
            if self.complete_reports:
                self.write_missing_reports(job, entry, out, summary.get("written") or [])
        return JobOutcome(index, job, OK, key=entry.key, run_dir=entry.run_dir, out_dir=out, summary=summary,
                          cached=True)

    def missing_reports(self, job: Job, entry: StoredJob | None) -> list[str]:
        """The report writers the job asks for that its stored run did not run; the plots too when the job
        wants copies of them in other formats (a stored run's plots are SVG only)."""
        have = set((entry.record.get("reporters") if entry is not None else None) or [])
        chosen = job.reporters or self.default_reporters()
        missing = [r for r in chosen if r not in have]
        if job.plot_formats and "plots" in chosen and "plots" not in missing:
            missing.append("plots")
        return missing

    def write_missing_reports(self, job: Job, entry: StoredJob | None, out: Path, written: Sequence[str]
                              ) -> RunResult | None:
        """Run the ``missing_reports`` on the saved counts of the stored run placed in ``out``: its result, with
        ``written`` (the stored run's files) and the new ones; None when none was missing."""
        missing = self.missing_reports(job, entry)
        if not missing:
            return None
        from ..api import write_reports
        from ..core.reporting import rewrite_summary
        from ..core.results import load_run

        log.info("writing the reports the stored run lacks: %s", ", ".join(missing))
        result = load_run(out)
        write_reports(result, out, reporters=missing, host=self.host, strict_plugins=self.strict_plugins,
                      writer_options=writer_options(job))
        result.written = list(dict.fromkeys([*list(written)[:-1], *result.written]))  # summary.json stays last
        rewrite_summary(result, out)  # listing the stored run's files too, not only the new reports'
        return result

    def begin(self, index: int, job: Job) -> tuple[Path, Path | None]:
        """The folder to write the job's run into, and the staging folder it lies in (None: no store)."""
        keyed = self.key(job)
        if keyed is None or self.store is None:
            out = self.place(index, job)
            if out is None:
                raise ValueError("a job without the store needs a place for its run")
            return out, None
        staging = self.store.begin(keyed[0])
        return staging / RUN, staging

    def finish(self, index: int, job: Job, run_dir: Path, staging: Path | None, result: RunResult | None,
               seconds: float) -> JobOutcome:
        """Commit a finished run to the store and place it for the user."""
        from ..core.results import SUMMARY

        keyed = self.key(job)
        if staging is None or keyed is None or self.store is None:
            summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
            return JobOutcome(index, job, OK, run_dir=run_dir, out_dir=run_dir, summary=summary, seconds=seconds,
                              result=result)
        reporters = list(job.reporters) if job.reporters else self.default_reporters()
        # The job's wall time beside its passes and reports: the rest is set-up (model, store) per model.
        timings = {"job": seconds, **(result.seconds if result is not None else {})}
        entry = self.store.commit(keyed[0], staging, keyed[1], {
            "job": job.to_json(), "reporters": reporters,
            "seconds": {k: round(float(v), 3) for k, v in timings.items()}})
        self._found[entry.key] = entry
        out = self.place(index, job)
        if out is not None:
            materialise(entry.run_dir, out)
        return JobOutcome(index, job, OK, key=entry.key, run_dir=entry.run_dir, out_dir=out,
                          summary=entry.summary(), seconds=seconds, result=result)

    def abandon(self, index: int, job: Job, run_dir: Path, staging: Path | None) -> None:
        if staging is None or self.store is None:
            return
        from ..core.results import SUMMARY

        out = self.place(index, job)
        if out is not None and (run_dir / SUMMARY).is_file():
            # The counts and summary.json are complete (a report writer failed after them): the user keeps
            # them to rebuild the reports from, as a run without the store would leave them; the store does not.
            materialise(run_dir, out)
        self.store.discard(staging)

    def default_reporters(self) -> list[str]:
        return [e.name for e in self.host.catalog("reporter") if e.metadata.get("default", False)]

    # ---- computing ------------------------------------------------------------------------------------------

    def dataset(self, job: Job) -> Any:
        """The job's concept dataset object, opened once per run and shared by every job that uses it."""
        ident = self._dataset_ident(job)
        if ident not in self._datasets:
            from ..api import resolve_dataset

            self._datasets[ident] = resolve_dataset(self.host, job.dataset, job.dataset_format, job.categories,
                                                    dict(job.dataset_options))
        return self._datasets[ident]

    def explainer(self, job: Job) -> ExplainerChoice | None:
        """The job's explainer, made by this host (None without ``--explain``)."""
        from ..api import choose_explainer

        return choose_explainer(self.host, job.explain, dict(job.explain_params), job.explain_units,
                                compat=job.compat)

    @staticmethod
    def _dataset_ident(job: Job) -> tuple[Any, ...]:
        return (job.dataset, job.dataset_format, job.categories, tuple(sorted(
            (k, str(v)) for k, v in job.dataset_options.items())))

    def compute(self, job: Job, run_dir: Path, progress: Progress | None) -> RunResult:
        """Dissect the job's model into ``run_dir`` in this process (reports and summary.json written)."""
        from ..api import dissect

        # A dataset this run opened already is shared; otherwise the run opens it after the model is resolved
        # (so a wrong model is reported before the built-in set is generated), and it is kept for the next job.
        ident = self._dataset_ident(job)
        opened = self._datasets.get(ident)
        arguments = dissect_arguments(job)
        if opened is not None:
            arguments.update(dataset=opened, dataset_format=None, categories=None, dataset_options=None)
        result = dissect(job.model, **arguments, out=run_dir,
                         reporters=list(job.reporters) if job.reporters else None, progress=progress,
                         host=self.host, strict_plugins=self.strict_plugins, writer_options=writer_options(job))
        if opened is None and result.dataset is not None:
            self._datasets[ident] = result.dataset
        return result

    def write_result(self, job: Job, result: RunResult, run_dir: Path) -> None:
        """Write a run computed elsewhere (e.g. merged from shards) into ``run_dir``: reports, summary last."""
        from ..api import write_reports

        run_dir.mkdir(parents=True, exist_ok=True)
        write_reports(result, run_dir, reporters=list(job.reporters) if job.reporters else None, host=self.host,
                      strict_plugins=self.strict_plugins, writer_options=writer_options(job))


def writer_options(job: Job) -> dict[str, Any]:
    """What the job asks of the report writers (passed to the writers whose factories name them)."""
    return {"plot_formats": list(job.plot_formats)} if job.plot_formats else {}


def dissect_arguments(job: Job) -> dict[str, Any]:
    """The keyword arguments of ``netdissection.dissect`` (and of ``netdissection.api.prepare``, which an
    executor's workers use) that the job stands for, beside its model: every executor runs a job from these."""
    from .layers import choose_layers

    return {"backend": job.backend, "dataset": job.dataset, "dataset_format": job.dataset_format,
            "categories": job.categories, "dataset_options": dict(job.dataset_options),
            "layers": functools.partial(choose_layers, job.layers, job.lenient_layers),
            "threshold": job.threshold, "threshold_params": dict(job.threshold_params), "quantile": job.quantile,
            "compat": job.compat, "batch_size": job.batch_size, "device": job.device, "workers": job.workers,
            "weights": job.weights, "pretrained": job.pretrained, "top_k": job.top_k, "skip_bad": job.skip_bad,
            "cache": job.cache, "cache_budget": job.cache_budget, "backend_options": dict(job.backend_options),
            "rotate": job.rotate, "rotate_seed": job.rotate_seed, "bootstrap": job.bootstrap,
            "bootstrap_seed": job.bootstrap_seed, "explain": job.explain, "explain_params": dict(job.explain_params),
            "explain_units": job.explain_units}


def prepare_job(job: Job, *, work_dir: str | Path | None = None, host: Any = None,
                strict_plugins: bool | None = None) -> PreparedRun:
    """The run a job stands for, prepared in this process as ``dissect`` prepares it — components built by name,
    layers chosen, the plan, input spec and provenance — without running a pass: what an executor's workers
    run shard by shard (``netdissection.core.scheduler.ShardRunner``). ``work_dir``: where the activation
    cache goes (default: the temporary folder)."""
    from ..api import prepare

    return prepare(job.model, **dissect_arguments(job), host=host, strict_plugins=strict_plugins, work_dir=work_dir)


def _has_layers(entry: StoredJob, requested: Sequence[str]) -> bool:
    from .layers import ALL_STAGES

    dissected = {layer["layer"] for layer in entry.summary().get("layers", [])}
    return all(name in dissected for name in requested if name != ALL_STAGES)


def dissect_stored(job: Job, out: Path, store: ResultsStore | None, host: Any, progress: Progress | None = None,
                   *, strict_plugins: bool | None = None) -> tuple[RunResult, JobOutcome]:
    """``dissect MODEL``: the job from the store when it is there (no model runs), else computed and stored;
    either way its full results end up in ``out``. Report writers the stored run did not have are run
    on its saved counts."""
    from ..core.results import load_run

    context = ExecutionContext(host, store, place=lambda index, job: out, strict_plugins=strict_plugins)
    outcome = execute(0, job, context, progress)
    if outcome.result is not None:
        return outcome.result, outcome
    written = list((outcome.summary or {}).get("written") or [])
    result = context.write_missing_reports(job, context.stored(job), out, written)
    if result is None:
        result = load_run(out)
        result.written = written
    return result, outcome
