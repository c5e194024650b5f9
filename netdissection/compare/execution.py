"""Running jobs through the results store, and the contract every executor plugin implements.

The executor contract (``dissect_register_executors``; ``factory(**options) -> Executor``):

- ``Executor.run(jobs, context)`` runs every job and yields one :class:`JobOutcome` per job as it
  finishes, in any order (``outcome.index`` is the job's position in ``jobs``). A job's own failure
  (a model that does not load, a checkpoint that does not fit) is an outcome with ``status="failed"``
  and a one-line ``error``, never an exception: the other jobs go on. Only an interruption
  (KeyboardInterrupt) or a broken executor stops the whole run.
- Around each job it calls ``context.events.job_started(index, job, total)`` (which returns the
  :class:`~netdissection.core.scheduler.Progress` for that job's passes, or None) and
  ``context.events.job_finished(outcome)``.
- The store is the context's business: ``context.lookup(job)`` says whether the job is already finished
  (a :class:`JobOutcome` with ``cached=True``), ``context.begin(job)`` gives the folder to write the run
  into, and ``context.finish(job, ...)`` commits it and places it where the user asked. An executor
  that computes a run elsewhere (shards on a cluster, merged on the driver) hands the merged
  :class:`~netdissection.core.types.RunResult` to ``context.write_result`` which writes its reports
  into that folder. :func:`run_job` is the whole sequence for a job computed in this process.

A run is written to ``<staging>/run`` (summary.json last), the staging folder renamed to the job's key
in one step; the user's copy (``--out``, or ``OUT/runs/<name>`` of a comparison) is linked from there.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..core.errors import DissectionError
from ..core.jobkey import Job, NotStorable, key_material, key_of
from ..core.store import RUN, ResultsStore, StoredJob, materialise

if TYPE_CHECKING:  # pragma: no cover
    from ..core.scheduler import Progress
    from ..core.types import RunResult

log = logging.getLogger(__name__)

OK = "ok"
FAILED = "failed"


@dataclass
class JobOutcome:
    """What became of one job."""

    index: int
    job: Job
    status: str  # OK or FAILED
    key: str | None = None  # None: run without the store
    run_dir: Path | None = None  # the run's folder as written (a store entry's run/, or the output folder)
    out_dir: Path | None = None  # where the user finds it (linked from the store), when asked for
    summary: dict[str, Any] | None = None  # the run's summary.json
    cached: bool = False  # found finished in the store: nothing was computed
    error: str | None = None
    seconds: float = 0.0  # wall time spent on the job here
    result: RunResult | None = field(default=None, repr=False)  # the results, when computed in this process


class JobEvents(Protocol):
    """Where an executor reports jobs starting and finishing (the CLI draws progress bars from them)."""

    def job_started(self, index: int, job: Job, total: int) -> Progress | None: ...

    def job_finished(self, outcome: JobOutcome) -> None: ...


class SilentEvents:
    def job_started(self, index: int, job: Job, total: int) -> Progress | None:
        log.info("job %d/%d: %s", index + 1, total, job.display)
        return None

    def job_finished(self, outcome: JobOutcome) -> None:
        if outcome.status == FAILED:
            log.warning("%s failed: %s", outcome.job.display, outcome.error)


@runtime_checkable
class Executor(Protocol):
    """Runs jobs; see the module docstring for the contract."""

    def run(self, jobs: Sequence[Job], context: ExecutionContext) -> Iterator[JobOutcome]: ...


def one_line(exc: BaseException) -> str:
    """A failure as one line: a user error's own message, else the exception's type and first line."""
    text = str(exc).strip()
    if not isinstance(exc, DissectionError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    first = text.splitlines()[0] if text else "failed"
    return first if len(first) <= 400 else first[:397] + "..."


class ExecutionContext:
    """What every job of a run shares: the plugin host, the store, where runs are placed, the datasets.

    ``place(index, job)`` names the folder the user gets each run in (None: only the store keeps it).
    """

    def __init__(self, host: Any, store: ResultsStore | None, *,
                 place: Callable[[int, Job], Path | None] | None = None, events: JobEvents | None = None) -> None:
        self.host = host
        self.store = store
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
                builtin = self._builtin_root(job) if job.dataset is None else None
                material = key_material(job, self.host, self.store.memo, builtin_root=builtin)
                self._keys[id(job)] = (job, (key_of(material), material))
            except NotStorable as exc:
                log.debug("%s: %s; it runs without the store", job.display, exc)
                self._keys[id(job)] = (job, None)
            finally:
                self.store.memo.save()
        return self._keys[id(job)][1]

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
        if out is not None:
            materialise(entry.run_dir, out)
        return JobOutcome(index, job, OK, key=entry.key, run_dir=entry.run_dir, out_dir=out,
                          summary=entry.summary(), cached=True)

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

    def abandon(self, staging: Path | None) -> None:
        if staging is not None and self.store is not None:
            self.store.discard(staging)

    def default_reporters(self) -> list[str]:
        return [e.name for e in self.host.catalog("reporter") if e.metadata.get("default", False)]

    # ---- computing ------------------------------------------------------------------------------------------

    def dataset(self, job: Job) -> Any:
        """The job's concept dataset object, opened once per run and shared by every job that uses it."""
        ident = self._dataset_ident(job)
        if ident not in self._datasets:
            if job.dataset is None:
                self._datasets[ident] = self.host.catalog("dataset").get("builtin").factory(
                    None, categories=job.categories, **dict(job.dataset_options))
            else:
                from ..core.run import resolve_dataset

                self._datasets[ident] = resolve_dataset(self.host, job.dataset, job.dataset_format, job.categories,
                                                        dict(job.dataset_options))
        return self._datasets[ident]

    def _builtin_root(self, job: Job) -> Path:
        return Path(self.dataset(job).describe()["path"])

    @staticmethod
    def _dataset_ident(job: Job) -> tuple[Any, ...]:
        return (job.dataset, job.dataset_format, job.categories, tuple(sorted(
            (k, str(v)) for k, v in job.dataset_options.items())))

    def compute(self, job: Job, run_dir: Path, progress: Progress | None) -> RunResult:
        """Dissect the job's model into ``run_dir`` in this process (reports and summary.json written)."""
        from ..core.run import dissect
        from .layers import choose_layers

        return dissect(job.model, backend=job.backend, dataset=self.dataset(job),
                       layers=functools.partial(choose_layers, job.layers, job.lenient_layers),
                       quantile=job.quantile, compat=job.compat, out=run_dir, batch_size=job.batch_size,
                       device=job.device, workers=job.workers, weights=job.weights, pretrained=job.pretrained,
                       top_k=job.top_k, reporters=list(job.reporters) if job.reporters else None,
                       skip_bad=job.skip_bad, progress=progress, host=self.host,
                       backend_options=dict(job.backend_options))

    def write_result(self, job: Job, result: RunResult, run_dir: Path) -> None:
        """Write a run computed elsewhere (e.g. merged from shards) into ``run_dir``: reports, summary last."""
        from ..core.reporting import write_reports

        run_dir.mkdir(parents=True, exist_ok=True)
        write_reports(self.host, result, run_dir, list(job.reporters) if job.reporters else None)


def _has_layers(entry: StoredJob, requested: Sequence[str]) -> bool:
    from .layers import ALL_STAGES

    dissected = {layer["layer"] for layer in entry.summary().get("layers", [])}
    return all(name in dissected for name in requested if name != ALL_STAGES)


def run_job(index: int, job: Job, context: ExecutionContext, progress: Progress | None = None) -> JobOutcome:
    """One job in this process: from the store if it is there, else computed, committed and placed.
    A failure becomes a failed outcome with its one-line error; nothing of it is left in the store."""
    started = time.perf_counter()
    try:
        return execute(index, job, context, progress)
    except Exception as exc:  # one job's failure is its row, never the end of the others
        log.debug("%s failed", job.display, exc_info=True)
        return JobOutcome(index, job, FAILED, key=context.known_key(job), error=one_line(exc),
                          seconds=time.perf_counter() - started)


def execute(index: int, job: Job, context: ExecutionContext, progress: Progress | None = None) -> JobOutcome:
    """:func:`run_job` letting errors through (``dissect MODEL`` reports them as such)."""
    started = time.perf_counter()
    found = context.lookup(index, job)
    if found is not None:
        found.seconds = time.perf_counter() - started
        return found
    run_dir, staging = context.begin(index, job)
    try:
        result = context.compute(job, run_dir, progress)
        return context.finish(index, job, run_dir, staging, result, time.perf_counter() - started)
    except BaseException:
        context.abandon(staging)  # a killed process leaves its staging folder for `dissect cache gc`
        raise


def dissect_stored(job: Job, out: Path, store: ResultsStore | None, host: Any,
                   progress: Progress | None = None) -> tuple[RunResult, JobOutcome]:
    """``dissect MODEL``: the job from the store when it is there (no model runs), else computed and stored;
    either way its full results end up in ``out``. Report writers the stored run did not have are run
    on its saved counts."""
    from ..core.results import load_run

    context = ExecutionContext(host, store, place=lambda index, job: out)
    outcome = execute(0, job, context, progress)
    if outcome.result is not None:
        return outcome.result, outcome
    entry = context.stored(job)
    have = set((entry.record.get("reporters") if entry is not None else None) or [])
    missing = [r for r in (job.reporters or context.default_reporters()) if r not in have]
    result = load_run(out)
    written = list((outcome.summary or {}).get("written") or [])
    if missing:
        from ..core.reporting import write_reports

        log.info("writing the reports the stored run lacks: %s", ", ".join(missing))
        write_reports(host, result, out, missing)
        written = list(dict.fromkeys([*written[:-1], *result.written]))  # summary.json stays last
    result.written = written
    return result, outcome
