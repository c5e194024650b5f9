"""The public API: the front door that wires the plugin registry to the core.

Every component is resolved by name — backend, dataset format, threshold rule and its parameters, report
writers — before any model is built or any pass runs; the core is then handed the objects
(``core.run.run_dissection``), and the lifecycle events it raises are relayed to the plugins' hooks, one
plugin at a time, so that a failing plugin is shown, recorded and skipped.

Light to import: the core's passes (and torch) load only when a run starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import DissectionError, UnknownNameError
from .core.explain import ExplainerChoice, explainer_params, parse_units
from .core.locks import locks_folder
from .core.parameters import keyword_parameters, settle_parameters
from .core.run import LayerChooser, QuietEvents, ThresholdChoice, WriterChoice, check_options
from .core.types import BackendOptions, LayerResult, RunResult
from .registry import Host, build_host
from .registry.failures import PluginFailure, raise_if_strict, report
from .registry.failures import strict_plugins as strict_plugins_flag

if TYPE_CHECKING:  # pragma: no cover
    from .core.protocols import Backend, ConceptDataset
    from .core.run import PreparedRun
    from .core.scheduler import Progress

log = logging.getLogger(__name__)

__all__ = ["build_host", "dissect", "load_results", "open_dataset", "write_reports"]

DEFAULT_THRESHOLD = "quantile"
#: Arguments the host itself gives a threshold factory whose signature names them (not user parameters).
RULE_CONTEXT = ("compat", "device")


def dissect(
    model: Any,
    *,
    backend: str | None = None,
    dataset: Any = None,
    dataset_format: str | None = None,
    layers: Sequence[str] | LayerChooser | None = None,
    categories: Sequence[str] | None = None,
    threshold: str | None = None,
    threshold_params: Mapping[str, Any] | None = None,
    quantile: float | None = None,
    compat: str = "paper",
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    top_k: int = 10,
    reporters: Sequence[str] | None = None,
    skip_bad: bool = False,
    cache: str = "auto",
    cache_budget: str | int | None = None,
    progress: Progress | None = None,
    host: Host | None = None,
    backend_options: Mapping[str, Any] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    strict_plugins: bool | None = None,
    rotate: float | None = None,
    rotate_seed: int = 0,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    explain: str | None = None,
    explain_params: Mapping[str, Any] | None = None,
    explain_units: Sequence[int] | str | None = None,
    writer_options: Mapping[str, Any] | None = None,
) -> RunResult:
    """Dissect ``model`` on a concept dataset; with ``out``, save the results and write the reports there.

    Args:
        model: a name or path a backend accepts (``"resnet18"``, ``"model.onnx"``), or an object such as a
            ``torch.nn.Module`` (then its layers are its module names).
        backend: the backend's name; default: the first plugin that claims ``model``.
        dataset: a concept dataset folder or file, a dataset object, or None for the built-in generated set.
        dataset_format: the dataset format's name when it cannot be detected from the path.
        layers: the layers to dissect (all in one forward pass); default: the last layer with a spatial map.
            A callable ``(layer infos, model name, select) -> names`` may choose them from the model's own
            list (``select(names)`` checks names as the backend does; ``select(None)``: its default layer).
        categories: the concept categories to use (default: all of the dataset's).
        threshold: the threshold rule's name (default ``"quantile"``: the paper's top-q quantile per unit).
        threshold_params: the rule's parameters, e.g. ``{"q": 0.01}`` for quantile.
        quantile: shortcut for the quantile rule's ``q`` (default 0.005).
        compat: ``"paper"`` (default) or ``"lite"`` to reproduce NetDissect-Lite's numbers.
        out: output folder; None computes the results without writing anything.
        batch_size, device, workers: how the passes run (``workers``: decoding processes, default cores − 1
            up to 4; 0 decodes in this process).
        weights, pretrained: a local weights file, or the framework's own pretrained weights.
        top_k: top images kept per unit (for the report's image strips).
        reporters: report writers to run (names; ``"a,b"`` works too); default: every default writer.
        skip_bad: skip and count unreadable samples instead of stopping.
        cache, cache_budget: where the reads after the first pass get the maps: ``"disk"`` (an activation
            cache), ``"recompute"`` (another forward pass) or ``"auto"`` (the disk when the cache fits
            ``cache_budget`` — bytes or a size like ``"20G"`` — and the free space).
        progress: an object with ``start(name, total)``, ``advance(images)``, ``finish()`` (rich bars in the CLI).
        host: the plugin host to use (default: a fresh ``build_host()``).
        backend_options: ``input_size``, ``mean``, ``std``, ``bgr`` for the backend, and ``runtime``
            (``"torch"``, ``"onnxruntime"`` or ``"auto"``: what runs a torch model's forward pass).
        dataset_options: format options (``image_column``, ``mask_columns``, ``split``, ``concepts``).
        strict_plugins: make any plugin failure an error (default: ``$NETDISSECTION_STRICT_PLUGINS``).
        rotate, rotate_seed: read every dissected layer's units in a rotated basis, Q^rotate with Q a random
            rotation drawn from ``rotate_seed`` and the layer's name (``rotate`` in [0, 1]; 0: no change).
        bootstrap, bootstrap_seed: resample the images ``bootstrap`` times (0: no bootstrap; 200 is
            customary) for 95% intervals of each unit's best IoU and of the detector counts, with the stability
            of each unit's label and detector status (``LayerResult.bootstrap``); the model does not run again.
        explain: an explainer's name (``"compositional"``): labels units with formulas of concepts too, in each
            ``LayerResult.explanations`` and ``<layer>/explanations.csv``.
        explain_params: the explainer's parameters, e.g. ``{"formula_length": 3, "beam": 5}``.
        explain_units: the units to explain, 1-based (``[1, 5, 9]`` or ``"1,5,9"``); default: every unit.
        writer_options: keyword arguments for the report writers whose factories name them, e.g.
            ``{"plot_formats": ["png", "pdf"]}`` (copies of the SVG plots) or ``{"top_k": 5}``.

    Returns the per-layer counts (thresholds, I, G, A, top images) and the provenance.
    Raises ``DissectionError`` (one line naming the thing and the fix) for any user mistake.
    """
    from .core.loading import default_workers
    from .core.rotation import check_rotation
    from .core.run import run_dissection
    from .core.scheduler import first_pass_batches

    rotation = check_rotation(rotate, rotate_seed)
    strict = strict_plugins_flag(strict_plugins)
    host = host if host is not None else build_host()
    announce_load_failures(host, strict)
    relay = HookRelay(host, strict)
    rule, writer_entries = check_run(host, backend=backend, dataset_format=dataset_format, threshold=threshold,
                                     threshold_params=threshold_params, quantile=quantile, compat=compat,
                                     batch_size=batch_size, device=device, cache=cache, cache_budget=cache_budget,
                                     reporters=reporters if out is not None else (), bootstrap=bootstrap,
                                     bootstrap_seed=bootstrap_seed, explain=explain, explain_params=explain_params,
                                     explain_units=explain_units, workers=workers)
    explainer = choose_explainer(host, explain, explain_params, explain_units, compat=compat)
    writers = make_writers(writer_entries, relay, writer_options)
    relay.writers = writers

    options = BackendOptions(weights=weights, device=device, pretrained=pretrained, **dict(backend_options or {}))
    workers = default_workers() if workers is None else workers
    # A named dataset opens in a blink and its loader starts at once: the workers decode the first batches
    # while the model is built (importing the model's library and reading its weights, on one core), and fork
    # from a process without the model in it. The built-in set may have to be generated first: it waits for
    # the model, whose name may be a typo that must fail at once.
    concept_set = started = None
    if dataset is not None or dataset_format is not None:
        concept_set = resolve_dataset(host, dataset, dataset_format, categories, dataset_options)
        started = first_pass_batches(concept_set, batch_size=batch_size, workers=workers, skip_bad=skip_bad,
                                     device=device)
    try:
        backend_name, model_backend = make_backend(host, model, backend, options, strict=strict,
                                                   failures=relay.runtime)
        try:
            if concept_set is None:
                concept_set = resolve_dataset(host, dataset, dataset_format, categories, dataset_options)
            return run_dissection(model_backend, concept_set, rule, backend_name=backend_name, model_ref=model,
                                  layers=layers, writers=writers, compat=compat, out=out, batch_size=batch_size,
                                  device=device, workers=workers, top_k=top_k, skip_bad=skip_bad, cache=cache,
                                  cache_budget=cache_budget, progress=progress, events=relay,
                                  plugins=host.plugin_versions(), rotation=rotation, bootstrap=bootstrap,
                                  bootstrap_seed=bootstrap_seed, explainer=explainer, started=started)
        finally:
            release = getattr(model_backend, "release", None)  # optional: what the run changed in a caller's model
            if callable(release):
                release()
    finally:
        if started is not None:
            started.close()  # a run that stopped before its first pass: the workers stop


def prepare(
    model: Any,
    *,
    backend: str | None = None,
    dataset: Any = None,
    dataset_format: str | None = None,
    layers: Sequence[str] | LayerChooser | None = None,
    categories: Sequence[str] | None = None,
    threshold: str | None = None,
    threshold_params: Mapping[str, Any] | None = None,
    quantile: float | None = None,
    compat: str = "paper",
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    top_k: int = 10,
    skip_bad: bool = False,
    cache: str = "auto",
    cache_budget: str | int | None = None,
    host: Host | None = None,
    backend_options: Mapping[str, Any] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    strict_plugins: bool | None = None,
    work_dir: str | Path | None = None,
    rotate: float | None = None,
    rotate_seed: int = 0,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    explain: str | None = None,
    explain_params: Mapping[str, Any] | None = None,
    explain_units: Sequence[int] | str | None = None,
) -> PreparedRun:
    """Resolve every component by name as :func:`dissect` does and prepare the run, without running a pass:
    the plan, input spec and provenance an executor needs to run the passes shard by shard in its workers
    (``core.scheduler.ShardRunner``), each worker building the very plan ``dissect`` would. The arguments
    are :func:`dissect`'s; ``work_dir`` is where the activation cache goes (default: the temporary folder)."""
    from .core.rotation import check_rotation
    from .core.run import prepare_run

    rotation = check_rotation(rotate, rotate_seed)
    strict = strict_plugins_flag(strict_plugins)
    host = host if host is not None else build_host()
    announce_load_failures(host, strict)
    rule, _ = check_run(host, backend=backend, dataset_format=dataset_format, threshold=threshold,
                        threshold_params=threshold_params, quantile=quantile, compat=compat, batch_size=batch_size,
                        device=device, cache=cache, cache_budget=cache_budget, reporters=(), bootstrap=bootstrap,
                        bootstrap_seed=bootstrap_seed, explain=explain, explain_params=explain_params,
                        explain_units=explain_units, workers=workers)
    explainer = choose_explainer(host, explain, explain_params, explain_units, compat=compat)
    options = BackendOptions(weights=weights, device=device, pretrained=pretrained, **dict(backend_options or {}))
    backend_name, model_backend = make_backend(host, model, backend, options, strict=strict)
    concept_set = resolve_dataset(host, dataset, dataset_format, categories, dataset_options)
    return prepare_run(model_backend, concept_set, rule, backend_name=backend_name, model_ref=model, layers=layers,
                       compat=compat, batch_size=batch_size, device=device, workers=workers, top_k=top_k,
                       skip_bad=skip_bad, cache=cache, cache_budget=cache_budget, plugins=host.plugin_versions(),
                       work_dir=work_dir, rotation=rotation, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
                       explainer=explainer)


def check_run(host: Host, *, backend: str | None = None, dataset_format: str | None = None,
              threshold: str | None = None, threshold_params: Mapping[str, Any] | None = None,
              quantile: float | None = None, compat: str = "paper", batch_size: int = 32, device: str = "cpu",
              cache: str = "auto", cache_budget: str | int | None = None,
              reporters: Sequence[str] | None = None, make_rule: bool = True, bootstrap: int = 0,
              bootstrap_seed: int = 0, explain: str | None = None, explain_params: Mapping[str, Any] | None = None,
              explain_units: Sequence[int] | str | None = None, workers: int | None = None
              ) -> tuple[ThresholdChoice, list[Any]]:
    """Check a run's options and every name it uses before a model is built, a dataset opened or a pass run,
    so that a typo fails at once, in one line. Returns the threshold rule (made once, so its parameter
    values are checked too, unless ``make_rule`` is False: then no framework is imported) and the writers'
    catalog entries (``reporters=()``: none; ``None``: the default writers)."""
    check_options(compat=compat, batch_size=batch_size, device=device, cache=cache, cache_budget=cache_budget,
                  bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, workers=workers)
    # Every name first, in a blink: a typo in a writer, rule or format fails before anything is imported.
    host.component("threshold", threshold or DEFAULT_THRESHOLD)
    entries = [host.component("reporter", name) for name in writer_names(host, reporters)] if reporters != () else []
    if backend is not None:
        host.component("backend", backend)
    if dataset_format is not None:
        host.component("dataset", dataset_format)
    rule = choose_threshold(host, threshold, threshold_params, quantile=quantile, compat=compat, device=device,
                            make=make_rule)
    choose_explainer(host, explain, explain_params, explain_units, compat=compat)
    return rule, entries


def load_results(path: str | Path) -> RunResult:
    """Load a finished run from its output folder (``summary.json`` and each layer's ``counts.npz``)."""
    from .core.results import load_run

    return load_run(path)


@locks_folder("out")  # never beside a run writing into the same folder (core/locks.py)
def write_reports(result: RunResult, out: str | Path, *, reporters: Sequence[str] | None = None,
                  writer_options: Mapping[str, Any] | None = None, host: Host | None = None,
                  strict_plugins: bool | None = None) -> list[Path]:
    """Write the reports of ``result`` (a live run or ``load_results(...)``) into ``out`` again: the counts
    and ``summary.json`` first, then each writer. ``reporters``: writer names (default: every default
    writer); ``writer_options``: keyword arguments given to the writer factories that name them
    (e.g. ``{"top_k": 5}``). Returns every path written, ``summary.json`` last."""
    from .core.reporting import write_results

    strict = strict_plugins_flag(strict_plugins)
    host = host if host is not None else build_host()
    announce_load_failures(host, strict)
    # The run's own failures stay on record, except its writers': they are written again now.
    earlier = [f for f in result.plugin_errors if not str(f.get("where", "")).startswith("report writer")]
    relay = HookRelay(host, strict, earlier=earlier)
    entries = [host.component("reporter", name) for name in writer_names(host, reporters)]
    relay.writers = make_writers(entries, relay, writer_options)
    written = write_results(result, Path(out), relay.writers, relay)
    relay.writers_done()
    return written


def open_dataset(path: Any = None, *, format: str | None = None, categories: Sequence[str] | None = None,
                 host: Host | None = None, **options: Any) -> ConceptDataset:
    """Open a concept dataset as ``dissect`` does: ``format`` named or detected from ``path``; None opens the
    built-in generated set. ``options`` are the format's (``image_column``, ``split``, ...)."""
    return resolve_dataset(host if host is not None else build_host(), path, format, categories, options)


# ----------------------------------------------------------------------------------------------- resolution


def announce_load_failures(host: Host, strict: bool) -> None:
    """The plugins that failed to load or register: one warning line each, or one error when strict."""
    failures = host.load_failures()
    raise_if_strict(failures, strict)
    if host.announced:
        return
    host.announced = True
    for failure in failures:
        going_on = "going on without it" if failure.where == "import" else "going on without that registration"
        report(failure, strict=False, going_on=going_on)


def resolve_backend(host: Host, model: Any, backend: str | None, *, strict: bool = False,
                    failures: list[PluginFailure] | None = None) -> str:
    """The backend named by the user, else the first plugin that claims the model reference."""
    catalog = host.catalog("backend")
    if backend is not None:
        host.component("backend", backend)  # unknown names fail here with close matches
        return backend
    answers = host.call_each("dissect_detect_backend", strict=strict, firstresult=True, failures=failures,
                             model_ref=model)
    if answers:
        plugin, name = answers[0]
        if str(name) not in catalog:
            broken = [f.line() for f in host.load_failures() if f.plugin == plugin]
            why = f"; {broken[0]}" if broken else f"; known backends: {', '.join(catalog.names())}"
            raise DissectionError(f"the plugin {plugin!r} claims {model} for the backend {str(name)!r}, which no "
                                  f"plugin registered{why}")
        return str(name)
    if isinstance(model, str) and (model.endswith(("/", "\\")) or Path(model).suffix):
        if not Path(model).exists():
            raise DissectionError(f"model file {model} does not exist")
        raise DissectionError(f"no backend loads {model}; pass --backend NAME (see: dissect backends)"
                              + _failed_note(host, "backend"))
    # A bare name nobody claims: close matches from every name-based backend (those registered with
    # ``names=``, a callable listing the names they take), or the name's owner if it did not detect it.
    known: list[str] = []
    for entry in catalog:
        names = entry.metadata.get("names")
        if names is None or not isinstance(model, str):
            continue
        try:
            listed = list(names())
        except DissectionError:  # a backend whose framework is not installed
            continue
        if model in listed:
            return entry.name
        known.extend(listed)
    if known:
        raise UnknownNameError("model", str(model), dict.fromkeys(known),
                               hint="list the backends with: dissect backends")
    raise DissectionError(f"no backend takes the model {model!r}; pass --backend NAME (see: dissect backends)"
                          + _failed_note(host, "backend"))


def _failed_note(host: Host, kind: str) -> str:
    from .registry.manager import COMPONENT_KINDS

    broken = [f for f in host.load_failures()
              if f.where in ("import", COMPONENT_KINDS[kind]) and not f.error.startswith("ConflictError")]
    return f"; {broken[0].line()}" if broken else ""


def make_backend(host: Host, model: Any, backend: str | None, options: BackendOptions, *,
                 strict: bool = False, failures: list[PluginFailure] | None = None) -> tuple[str, Backend]:
    """The backend's name and the backend object for ``model``."""
    name = resolve_backend(host, model, backend, strict=strict, failures=failures)
    factory = host.component("backend", name).factory
    if hasattr(factory, "runtimes"):  # a class says what it offers before it loads a model
        _check_runtime(name, factory, options.runtime)
    made = factory(model, options)
    _check_runtime(name, made, options.runtime)
    return name, made


def _check_runtime(name: str, backend: Any, runtime: str | None) -> None:
    """``--runtime`` only for a backend that offers it (``Backend.runtimes``): never silently ignored."""
    if runtime is None:
        return
    offered = tuple(getattr(backend, "runtimes", None) or ())
    if runtime not in offered:
        runs_on = f"it offers {', '.join(offered)}" if offered else "it has no choice of runtime"
        raise DissectionError(f"the {name} backend does not run on --runtime {runtime} ({runs_on}); leave out "
                              "--runtime")


def resolve_dataset(host: Host, dataset: Any, dataset_format: str | None, categories: Sequence[str] | None,
                    options: Mapping[str, Any] | None = None) -> ConceptDataset:
    """A concept dataset object from a path (format detected or named), or the built-in default set."""
    catalog = host.catalog("dataset")
    options = dict(options or {})
    categories = list(categories) if categories else None
    if dataset is None and dataset_format is None:
        return host.component("dataset", "builtin").factory(None, categories=categories, **options)
    if dataset is not None and not isinstance(dataset, str | Path):
        return dataset  # already a dataset object (Python API)
    if dataset_format is not None:
        return host.component("dataset", dataset_format).factory(dataset, categories=categories, **options)
    for entry in reversed(list(catalog)):  # like backends: a plugin's format may claim a path before the built-ins
        detect = entry.metadata.get("detect")
        if detect is not None and detect(dataset):
            return entry.factory(dataset, categories=categories, **options)
    path = Path(str(dataset)).expanduser()
    if not path.exists():
        raise DissectionError(f"the concept dataset {path} does not exist")
    raise DissectionError(f"cannot tell the format of the dataset {path}; pass --dataset-format "
                          f"({', '.join(catalog.names())})" + _failed_note(host, "dataset"))


def choose_threshold(host: Host, name: str | None, params: Mapping[str, Any] | None, *, quantile: float | None,
                     compat: str, device: str, make: bool = True) -> ThresholdChoice:
    """The threshold rule and its parameters, checked against the factory's signature — and, with ``make``,
    made once — before any pass runs, so that a wrong parameter fails in a line, not after the activation
    pass. ``params`` of the choice are what the rule runs with, defaults included (provenance, job keys)."""
    name = name or DEFAULT_THRESHOLD
    entry = host.component("threshold", name)
    params = dict(params or {})
    if quantile is not None:
        if name != DEFAULT_THRESHOLD:
            raise DissectionError(f"--quantile sets the quantile rule's q; the {name!r} rule takes "
                                  "--threshold-param KEY=VALUE")
        if "q" in params and params["q"] != quantile:
            raise DissectionError(f"--quantile {quantile} and --threshold-param q={params['q']} disagree; give one")
        params["q"] = quantile
    for reserved in RULE_CONTEXT:
        if reserved in params:
            raise DissectionError(f"--threshold-param {reserved}=... is not a rule parameter; use --{reserved}")
    named, takes_any = keyword_parameters(entry.factory)
    # The first two parameters are (units, values_per_unit); the rule's own parameters follow.
    own = {n: p for i, (n, p) in enumerate(named.items()) if i >= 2 and n not in RULE_CONTEXT}
    recorded = settle_parameters(f"threshold rule {name!r}", "--threshold-param", own, params, takes_any)
    kwargs = dict(params)
    kwargs.update({k: v for k, v in (("compat", compat), ("device", device)) if k in named})
    if "compat" in named:
        recorded["compat"] = compat
    choice = ThresholdChoice(name=name, factory=entry.factory, kwargs=kwargs, params=recorded, plugin=entry.plugin)
    if not make:
        return choice
    try:
        choice.make(1, 1000)  # parameter values are checked here, before the passes, by the rule itself
    except DissectionError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        given = ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"
        raise DissectionError(f"threshold rule {name!r} (plugin {entry.plugin!r}) refuses {given}: {detail}") from None
    return choice


def choose_explainer(host: Host, name: str | None, params: Mapping[str, Any] | None,
                     units: Sequence[int] | str | None, *, compat: str = "paper") -> ExplainerChoice | None:
    """The explainer of a run (None without ``name``), made once so that its parameter values are checked before
    any pass runs; its parameters as it runs with them (defaults included) and the units, 1-based."""
    if name is None:
        if params:
            flags = ", ".join("--" + key.replace("_", "-") for key in params)
            raise DissectionError(f"{flags}: an explainer's parameters; add --explain NAME (e.g. --explain "
                                  "compositional)")
        if units is not None:
            raise DissectionError("--units says which units to explain; add --explain NAME (e.g. --explain "
                                  "compositional)")
        return None
    entry = host.component("explainer", name)
    kwargs, recorded = explainer_params(name, entry.factory, params or {}, compat=compat)
    chosen = parse_units(units)
    try:
        explainer = entry.factory(**kwargs)
    except DissectionError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        given = ", ".join(f"{k}={v}" for k, v in (params or {}).items()) or "no parameters"
        raise DissectionError(f"explainer {name!r} (plugin {entry.plugin!r}) refuses {given}: {detail}") from None
    return ExplainerChoice(name=name, explainer=explainer, params=recorded, units=chosen, plugin=entry.plugin)


def writer_names(host: Host, names: Sequence[str] | None) -> list[str]:
    """The writers asked for (repeatable, commas allowed), else every default writer, in registration order."""
    values = [names] if isinstance(names, str) else list(names or ())
    chosen = [n.strip() for value in values for n in str(value).split(",") if n.strip()]
    if chosen:
        return list(dict.fromkeys(chosen))
    return [e.name for e in host.catalog("reporter") if e.metadata.get("default", False)]


def make_writers(entries: Sequence[Any], relay: HookRelay,
                 options: Mapping[str, Any] | None = None) -> list[WriterChoice]:
    """Make each writer; ``options`` go to the factories whose signature names them. A factory that raises
    (other than ``DissectionError``) is a failure of its plugin: shown, recorded, and the writer skipped."""
    writers = []
    for entry in entries:
        named, _ = keyword_parameters(entry.factory)
        kwargs = {k: v for k, v in (options or {}).items() if k in named and v is not None}
        try:
            writer = entry.factory(**kwargs)
        except DissectionError:
            raise
        except Exception as exc:
            relay.fail(PluginFailure.of(entry.plugin, f"report writer {entry.name!r}", exc))
            continue
        writers.append(WriterChoice(entry.name, writer, entry.plugin))
    return writers


# ----------------------------------------------------------------------------------------------- events


class HookRelay(QuietEvents):
    """The core's run events, relayed to the plugins' lifecycle hooks one plugin at a time."""

    def __init__(self, host: Host, strict: bool, earlier: Sequence[Mapping[str, str]] = ()) -> None:
        super().__init__()
        self.host, self.strict = host, strict
        self.earlier = [dict(f) for f in earlier]
        self.runtime: list[PluginFailure] = []
        self.writers: list[WriterChoice] = []
        self._failed_writers: set[str] = set()

    def _call(self, hook: str, *, strict: bool | None = None, **kwargs: Any) -> None:
        self.host.call_each(hook, strict=self.strict if strict is None else strict, failures=self.runtime,
                            **kwargs)

    def run_start(self, run: dict[str, Any]) -> None:
        self._call("dissect_run_start", run=run)

    def layer_start(self, run: dict[str, Any], layer: str) -> None:
        self._call("dissect_layer_start", run=run, layer=layer)

    def layer_finish(self, run: dict[str, Any], result: LayerResult) -> None:
        self._call("dissect_layer_finish", run=run, result=result)

    def run_finish(self, run: dict[str, Any], result: RunResult) -> None:
        self.writers_done()
        self._call("dissect_run_finish", run=run, result=result)

    def run_error(self, run: dict[str, Any], error: BaseException) -> None:
        self._call("dissect_run_error", strict=False, run=run, error=error)  # never hide the run's own error

    def fail(self, failure: PluginFailure) -> None:
        """A failure met outside a hook (a report writer): recorded, then shown (or raised when strict)."""
        self.runtime.append(failure)
        if failure.where.startswith("report writer"):
            self._failed_writers.add(failure.where)
        record = self.host.record(failure.plugin)
        self.host.runtime_log.update([], [(failure, record.version if record else "?")])
        report(failure, strict=self.strict)

    def writer_failed(self, writer: WriterChoice, error: Exception) -> None:
        self.fail(PluginFailure.of(writer.plugin, f"report writer {writer.name!r}", error))

    def writers_done(self) -> None:
        """The writers that ran fine no longer count as failing in the runtime log."""
        ok = [(w.plugin, f"report writer {w.name!r}") for w in self.writers]
        self.host.runtime_log.update([p for p in ok if p[1] not in self._failed_writers], [])

    def failures(self) -> list[dict[str, str]]:
        merged: list[dict[str, str]] = []
        for failure in [*self.earlier, *(f.as_dict() for f in self.host.load_failures()),
                        *(f.as_dict() for f in self.runtime)]:
            if failure not in merged:
                merged.append(failure)
        return merged
