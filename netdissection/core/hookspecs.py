"""The hooks of the netdissection host (pluggy).

Registration hooks are called once, when a plugin manager is built: each plugin hands its
components to the ``register`` callable it is given, and the host keeps the policy (names,
conflicts, catalogs). Per-batch work never runs through hooks: it runs on the component objects.
Lifecycle hooks are broadcast to every plugin for progress, logging and side outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from .types import LayerResult, RunResult

PROJECT = "netdissection"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callable handed to registration hooks: ``register(name, factory, description=...)``."""

    def __call__(self, name: str, factory: Any, *, description: str = "", **metadata: Any) -> None: ...


@hookspec
def dissect_register_backends(register: Register) -> None:
    """Register backends: ``register(name, factory, description=..., accepts=...)``.

    ``factory(model_ref, options: BackendOptions) -> Backend`` imports its framework lazily, so that
    listing plugins stays instant and a missing extra fails only when the backend is used.
    All implementations are called; each registers zero or more backends.
    """


@hookspec
def dissect_register_datasets(register: Register) -> None:
    """Register concept dataset formats: ``register(name, factory, description=..., detect=...)``.

    ``factory(path, categories=None, **options) -> ConceptDataset``. ``detect(path) -> bool`` (optional)
    lets ``--dataset PATH`` find the format without ``--dataset-format``. Optional too, for ``dissect data``:
    ``validate(path, progress=None)`` returning a report with ``problems`` (a thorough check; without it,
    ``validate`` loads every sample) and ``writer(dataset, dest, progress=None) -> Path`` (makes the format
    a ``convert --format`` target).
    """


@hookspec
def dissect_register_thresholds(register: Register) -> None:
    """Register threshold rules: ``register(name, factory, description=...)``.

    ``factory(units, values_per_unit, **params) -> ThresholdRule``.
    """


@hookspec
def dissect_register_reporters(register: Register) -> None:
    """Register report writers: ``register(name, factory, description=..., default=True)``.

    ``factory(**options) -> ReportWriter``. Writers registered with ``default=True`` run on every
    run unless the user picks writers explicitly.
    """


@hookspec
def dissect_register_executors(register: Register) -> None:
    """Register executors, which run the jobs of ``dissect compare``: ``register(name, factory, description=...)``.

    ``factory(**options) -> Executor`` (options from the command line, e.g. ``address``, ``shards``; refuse
    the ones that do not apply). The contract is in ``netdissection.compare.execution``: ``run(jobs,
    context)`` yields one outcome per job, a job's failure being its outcome, not an exception.
    """


@hookspec
def dissect_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``dissect`` command group (``@cli.command()``)."""


@hookspec(firstresult=True)
def dissect_detect_backend(model_ref: str) -> str | None:
    """Name the backend that should load ``model_ref`` when no ``--backend`` is given.

    The first non-None answer wins; plugins are asked in reverse registration order (pluggy's
    rule: later plugins first), so a third-party plugin can claim a reference before the built-ins.
    Among the built-ins the order is: ``.onnx`` files → onnx; an ``nn.Module`` or a torchvision model
    name → torchvision; any other ``timm.list_models()`` name → timm (its hook is ``trylast``, so a name
    both know, such as ``resnet18``, stays torchvision's). ``--backend`` overrides detection.
    """


@hookspec
def dissect_run_start(run: dict[str, Any]) -> None:
    """A run is about to start; ``run`` holds its provenance (model, dataset, layers, rule)."""


@hookspec
def dissect_layer_start(run: dict[str, Any], layer: str) -> None:
    """A layer's passes are about to start (all layers share the same passes)."""


@hookspec
def dissect_layer_finish(run: dict[str, Any], result: LayerResult) -> None:
    """A layer's counts and scores are complete."""


@hookspec
def dissect_run_finish(run: dict[str, Any], result: RunResult) -> None:
    """A run finished and its reports are written."""


@hookspec
def dissect_run_error(run: dict[str, Any], error: BaseException) -> None:
    """A run stopped with an error; nothing that looks complete was written."""
