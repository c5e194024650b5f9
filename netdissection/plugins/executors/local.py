"""The ``local`` executor: the jobs one after another, in this process.

Each job uses the whole machine (its passes already use every core and the data-loading workers), and
everything a process pays once — importing the frameworks, building the plugin host, opening the concept
dataset — is paid once for the whole comparison, not once per model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ...core.errors import refuse_options
from ...core.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from ...core.execution import JobContext, JobOutcome
    from ...core.jobkey import Job


class LocalExecutor:
    """Runs jobs in turn in this process; a job that fails is its outcome and the next one starts."""

    name = "local"

    def __init__(self, **options: Any) -> None:
        refuse_options({k: v for k, v in options.items() if v is not None}, "the local executor")

    def run(self, jobs: Sequence[Job], context: JobContext) -> Iterator[JobOutcome]:
        from ...core.execution import run_job

        for index, job in enumerate(jobs):
            progress = context.events.job_started(index, job, len(jobs))
            outcome = run_job(index, job, context, progress)
            context.events.job_finished(outcome)
            yield outcome


@hookimpl
def dissect_register_executors(register) -> None:  # type: ignore[no-untyped-def]
    register("local", LocalExecutor, description="jobs one after another in this process (the default)")
