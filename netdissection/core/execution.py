"""The contract every executor plugin implements, and the sequence of one job.

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

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import DissectionError
from .jobkey import Job

if TYPE_CHECKING:  # pragma: no cover
    from .explain import ExplainerChoice
    from .scheduler import Progress
    from .types import RunResult

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


class JobContext(Protocol):
    """What an executor is handed with the jobs: the events to report to and the store's side of each job
    (``netdissection.compare.execution.ExecutionContext`` is the host's)."""

    events: JobEvents

    def lookup(self, index: int, job: Job) -> JobOutcome | None:
        """The outcome of a job already finished in the store (placed where the user asked), or None."""
        ...

    def begin(self, index: int, job: Job) -> tuple[Path, Path | None]:
        """The folder to write the job's run into, and the staging folder it lies in (None: no store)."""
        ...

    def compute(self, job: Job, run_dir: Path, progress: Progress | None) -> RunResult:
        """Dissect the job's model into ``run_dir`` in this process (reports and summary.json written)."""
        ...

    def write_result(self, job: Job, result: RunResult, run_dir: Path) -> None:
        """Write a run computed elsewhere (e.g. merged from shards) into ``run_dir``: reports, summary last."""
        ...

    def finish(self, index: int, job: Job, run_dir: Path, staging: Path | None, result: RunResult | None,
               seconds: float) -> JobOutcome:
        """Commit a finished run to the store and place it for the user."""
        ...

    def abandon(self, index: int, job: Job, run_dir: Path, staging: Path | None) -> None:
        """Remove what a job that did not finish wrote to the store; counts it completed (its summary.json was
        written before a report writer failed) go where the user asked for the run, never into the store."""
        ...

    def known_key(self, job: Job) -> str | None:
        """The job's key if it was computed already (never raises)."""
        ...

    def dataset(self, job: Job) -> Any:
        """The job's concept dataset object, opened once per run and shared by the jobs that use it (an executor
        that runs the passes elsewhere needs it here too: its size, its vocabulary, and the reports' images)."""
        ...

    def explainer(self, job: Job) -> ExplainerChoice | None:
        """The job's explainer (None without ``--explain``): an executor that runs the passes elsewhere runs it
        here, on the merged results, its reads sent to the shards."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs jobs; see the module docstring for the contract."""

    def run(self, jobs: Sequence[Job], context: JobContext) -> Iterator[JobOutcome]: ...


def one_line(exc: BaseException) -> str:
    """A failure as one line: a user error's own message, else the exception's type and first line."""
    text = str(exc).strip()
    if not isinstance(exc, DissectionError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    first = text.splitlines()[0] if text else "failed"
    return first if len(first) <= 400 else first[:397] + "..."


def run_job(index: int, job: Job, context: JobContext, progress: Progress | None = None) -> JobOutcome:
    """One job in this process: from the store if it is there, else computed, committed and placed.
    A failure becomes a failed outcome with its one-line error; nothing of it is left in the store."""
    started = time.perf_counter()
    try:
        return execute(index, job, context, progress)
    except Exception as exc:  # one job's failure is its row, never the end of the others
        log.debug("%s failed", job.display, exc_info=True)
        return JobOutcome(index, job, FAILED, key=context.known_key(job), error=one_line(exc),
                          seconds=time.perf_counter() - started)


def execute(index: int, job: Job, context: JobContext, progress: Progress | None = None) -> JobOutcome:
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
        # (a killed process leaves its staging folder for `dissect cache gc`)
        context.abandon(index, job, run_dir, staging)
        raise
