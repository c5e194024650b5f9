"""The hooks of the netdissection host (pluggy), with their exact signatures and how each is called.

A plugin is a module or object with ``@netdissection.hookimpl`` functions named after these hooks; an
implementation may take any subset of a hook's arguments (pluggy passes them by name), so a hook can gain an
argument without breaking older plugins.

How the host calls them — the same for built-in and third-party plugins:

- **Registration hooks** (``dissect_register_*``) are called once per plugin when a host is built
  (``netdissection.build_host()``; the CLI builds one per command), each plugin's implementation on its
  own, in registration order (built-ins, then entry points, then ``extra_plugins``). Each hands its
  components to the ``register`` callable it receives; the host keeps the policy: a name already taken
  for that kind is refused (the first registration stays) and the refusal is recorded against the
  later plugin; the plugin's other registrations go on. Every error is kept and shown by
  ``dissect plugins``. Per-batch work never runs through hooks: it runs on the component objects.
- **Detection** (``dissect_detect_backend``) is asked when no ``--backend`` is given: implementations in
  pluggy's order (``tryfirst``, then later-registered plugins first, then ``trylast``), each on its own;
  the first answer that is not ``None`` wins.
- **Lifecycle hooks** (``dissect_run_*``, ``dissect_layer_*``) are broadcast to every implementation, each
  on its own, for progress, logging and side outputs; return values are ignored.

Failures are contained per plugin: an implementation that raises is skipped, the error is shown in one
line naming the plugin, saved in ``summary.json`` (``plugin_errors``) and shown by ``dissect plugins``; the
run goes on with the other plugins. ``--strict-plugins`` (or ``NETDISSECTION_STRICT_PLUGINS=1``) turns any
plugin failure into an error (exit status 2). A plugin that raises ``DissectionError`` reports a user
mistake: that stops the run with its message. Hook wrappers (``wrapper=True``) are not called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click
    from rich.console import Console

    from .types import LayerResult, RunResult

PROJECT = "netdissection"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callable handed to registration hooks: ``register(name, factory, description=..., **metadata)``.

    ``name`` is how users pick the component (``--backend NAME``, ``--threshold NAME``, ...); ``factory``
    makes the component object (see each hook for its arguments); ``description`` is one line for
    ``dissect plugins``; ``metadata`` holds the hook's optional keywords.
    """

    def __call__(self, name: str, factory: Callable[..., Any], *, description: str = "", **metadata: Any) -> None: ...


class CommandContext(Protocol):
    """What a ``dissect`` subcommand gets from the host: the same object the built-in commands use.

    It is handed to ``dissect_register_commands`` and, while a command runs, it is the click context's
    ``obj`` (take it with ``@click.pass_obj``).
    """

    #: The plugin host of this command (``catalog(kind)``, ``plugins``): pass it to ``netdissection``'s
    #: functions (``open_dataset``, ``write_reports``, ``dissect``) as ``host=``.
    host: Any
    #: Results go to ``out`` (stdout); progress, notices and errors to ``err`` (stderr).
    out: Console
    err: Console

    def setup_logging(self, verbose: int) -> None:
        """Log to ``err`` at WARNING, INFO for ``verbose`` 1, DEBUG for 2; plugin failures as one line each."""
        ...

    def split(self, values: Sequence[str]) -> list[str]:
        """Values of a repeatable option that also takes commas: ``("a,b", "c")`` → ``["a", "b", "c"]``."""
        ...

    def verbose_option(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``-v/--verbose`` (a count) as the ``verbose`` parameter."""
        ...

    def strict_plugins_option(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``--strict-plugins`` as the ``strict_plugins`` parameter (True or None,
        so that ``NETDISSECTION_STRICT_PLUGINS`` applies when the flag is not given)."""
        ...

    def threshold_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``--threshold``, ``--threshold-param KEY=VALUE`` (the ``threshold_params``
        dict, numbers read as numbers) and ``--quantile``, as ``dissect MODEL`` has them."""
        ...

    def input_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``--input-size``, ``--mean``, ``--std`` and ``--bgr``."""
        ...

    def bootstrap_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``--bootstrap B`` and ``--bootstrap-seed S`` (ints, default 0)."""
        ...

    def explain_options(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``--explain NAME``, ``--explain-param KEY=VALUE``, ``--formula-length``,
        ``--beam`` and ``--units``, as ``dissect MODEL`` has them (see ``explain_arguments``)."""
        ...

    def explain_arguments(self, explain: str | None, explain_params: dict[str, Any], formula_length: int | None,
                          beam: int | None, units: str | None) -> dict[str, Any]:
        """The values of ``explain_options`` as ``dissect``'s ``explain``, ``explain_params`` and
        ``explain_units``; raises ``DissectionError`` where the named options and ``--explain-param``
        disagree, or the units do not parse."""
        ...

    def runtime_option(self, command: Callable[..., Any]) -> Callable[..., Any]:
        """A click decorator adding ``--runtime torch|onnxruntime|auto`` (the ``runtime`` parameter, None when
        not given), as ``dissect MODEL`` has it."""
        ...

    def backend_options(self, input_size: Any, mean: Any, std: Any, bgr: bool,
                        runtime: str | None = None) -> dict[str, Any]:
        """The values of ``input_options`` (and ``runtime_option``) as ``dissect(backend_options=...)``: only
        those the user set."""
        ...

    def print_summary(self, result: RunResult, out_dir: Any, seconds: float | None = None) -> None:
        """The terminal summary of a run, as ``dissect MODEL`` prints it, to ``out``."""
        ...


@hookspec
def dissect_register_backends(register: Register) -> None:
    """Register backends: ``register(name, factory, description=..., accepts=..., requires=..., names=...)``.

    ``factory(model_ref, options: BackendOptions) -> Backend``. ``model_ref`` is what the user gave: a
    string (a name or a file path) from the CLI; from the Python API also an ``os.PathLike`` or any object,
    such as a ``torch.nn.Module``. The factory imports its framework itself (never at module level), so
    listing plugins stays instant; it raises ``DissectionError`` for a model it cannot load.

    Optional metadata: ``accepts`` (one line for ``dissect backends``: what the backend takes),
    ``requires`` (a tuple of importable package names; ``dissect backends`` shows each as ok/missing in its
    ``needs`` column), ``names`` (a callable listing the model names the backend takes; an unclaimed name
    gets close matches from these lists).
    """


@hookspec
def dissect_register_datasets(register: Register) -> None:
    """Register concept dataset formats: ``register(name, factory, description=..., detect=..., ...)``.

    ``factory(path, categories=None, **options) -> ConceptDataset``: ``categories`` a list of category
    names to keep (None: all); ``options`` what the user passed (``image_column``, ``mask_columns``,
    ``split``, ``concepts``); a format refuses options it does not take (``core.errors.refuse_options``).
    The dataset's ``describe()`` must hold ``format`` (this name), ``path``, ``images`` and
    ``categories``, plus ``options`` for anything else the factory needs: reports reopen the dataset with
    ``factory(path, categories=..., **options)`` (without them the rebuilt HTML report has no image strips).

    Optional metadata: ``detect(path) -> bool`` (lets ``--dataset PATH`` find the format without
    ``--dataset-format``; formats registered later are asked first, so a plugin may claim a path before the
    built-ins); for ``dissect data``, ``validate(path, progress=None)`` returning a report with
    ``problems`` (without it, ``validate`` loads every sample) and ``writer(dataset, dest, progress=None)
    -> Path`` (makes the format a ``convert --format`` target).
    """


@hookspec
def dissect_register_thresholds(register: Register) -> None:
    """Register threshold rules: ``register(name, factory, description=...)``; ``--threshold NAME`` picks one.

    Each layer gets its own rule: ``factory(units, values_per_unit, **params) -> ThresholdRule``, where
    ``values_per_unit`` is how many activation values each unit will see over the whole dataset, and
    ``params`` are the user's ``--threshold-param KEY=VALUE`` (``threshold_params=`` in Python; numbers
    arrive as int or float). Besides these, the host passes ``compat`` (``"paper"`` or ``"lite"``) and
    ``device`` (``"cpu"``, ``"cuda:0"``, ...) to factories whose signature names them. A parameter the
    factory's signature does not take is refused before any pass runs, unless it takes ``**params``;
    provenance records the rule's name, plugin and parameters (defaults from the signature included).
    """


@hookspec
def dissect_register_reporters(register: Register) -> None:
    """Register report writers: ``register(name, factory, description=..., default=True)``.

    ``factory(**options) -> ReportWriter``: a run calls ``factory()``; ``dissect report --top-k K`` passes
    ``top_k=K`` to factories whose signature names ``top_k``. Writers registered with ``default=True`` run on
    every run unless the user names writers (``--report a,b``). ``write(result, out_dir)`` runs after the
    counts and ``summary.json`` are saved, writes only under ``out_dir``, atomically (``core.files``), and
    returns the paths it wrote.
    """


@hookspec
def dissect_register_executors(register: Register) -> None:
    """Register executors, which run the jobs of ``dissect compare``: ``register(name, factory, description=...)``.

    ``factory(**options) -> Executor`` (options from the command line, e.g. ``address``, ``shards``; refuse
    the ones that do not apply). The contract is in ``netdissection.compare.execution``: ``run(jobs,
    context)`` yields one outcome per job, a job's failure being its outcome, not an exception.
    """


@hookspec
def dissect_register_explainers(register: Register) -> None:
    """Register explainers, which label units otherwise than with one concept: ``register(name, factory,
    description=...)``; ``--explain NAME`` picks one (``explain=`` in Python).

    ``factory(**params) -> Explainer`` (``core.explain``): ``params`` are the user's ``--explain-param
    KEY=VALUE`` and named options (``--formula-length N`` is ``formula_length=N``, ``--beam B`` is
    ``beam=B``); the host also passes ``compat`` to factories whose signature names it. A parameter the
    signature does not take is refused before any pass runs (unless it takes ``**params``); the factory
    refuses bad values with ``DissectionError``, and is called once while the options are checked, so keep
    it cheap. Provenance and the job key record the name, plugin and parameters (defaults included) and the
    units. The explainer's ``explain(layers, read, units)`` runs after the IoU pass, with ``read(factory)``
    for further passes over the dataset; its rows go to ``<layer>/explanations.csv`` and the HTML report.
    """


@hookspec
def dissect_register_commands(cli: click.Group, context: CommandContext) -> None:
    """Add subcommands to the ``dissect`` group: ``cli.add_command(...)`` or ``@cli.command()``.

    Called once per CLI start, each plugin on its own; ``context`` (also ``click`` context ``obj`` while a
    command runs) gives the host, the consoles, the logging set-up and option helpers.
    """


@hookspec(firstresult=True)
def dissect_detect_backend(model_ref: Any) -> str | None:
    """Name the backend that should load ``model_ref`` when no ``--backend`` is given, or return None.

    ``model_ref`` is a string from the CLI; from Python also a path or an object (an ``nn.Module``). The
    first non-None answer wins; plugins are asked in pluggy's order (later plugins first), so a third-party
    plugin can claim a reference before the built-ins. Among the built-ins: ``.onnx`` files → onnx; an
    ``nn.Module`` or a torchvision model name → torchvision; any other ``timm.list_models()`` name → timm
    (its hook is ``trylast``, so a name both know, such as ``resnet18``, stays torchvision's).
    ``--backend`` overrides detection. Keep it cheap: it runs for every model reference.
    """


@hookspec
def dissect_run_start(run: dict[str, Any]) -> None:
    """A run is about to start its passes; ``run`` is its provenance (model, backend, dataset, layers,
    threshold rule, plugins), the same dict that is saved in ``summary.json``."""


@hookspec
def dissect_layer_start(run: dict[str, Any], layer: str) -> None:
    """A layer is about to be dissected; called for every layer before the passes (which all layers share)."""


@hookspec
def dissect_layer_finish(run: dict[str, Any], result: LayerResult) -> None:
    """A layer's thresholds and counts are complete (after both passes, before anything is written)."""


@hookspec
def dissect_run_finish(run: dict[str, Any], result: RunResult) -> None:
    """A run finished: its counts, ``summary.json`` and reports are written (``result.written``)."""


@hookspec
def dissect_run_error(run: dict[str, Any], error: BaseException) -> None:
    """A run stopped with ``error`` after ``dissect_run_start``; nothing that looks complete was written."""
