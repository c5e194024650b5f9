"""Builds the plugin host: built-in plugins and entry points, loaded the same way, each on its own; calls
hooks one plugin at a time so that a failing plugin is recorded and skipped, never fatal."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..core import hookspecs
from ..core.errors import DissectionError
from ..core.hookspecs import PROJECT
from .catalog import Catalog, ConflictError, Entry
from .failures import PluginFailure, RuntimeFailureLog, report

ENTRY_POINT_GROUP = "netdissection"

#: Built-in plugin modules, registered exactly as third-party plugins are.
BUILTIN_PLUGINS = (
    "netdissection.plugins.backends.torchvision_backend",
    "netdissection.plugins.backends.timm_backend",
    "netdissection.plugins.backends.onnx_backend",
    "netdissection.plugins.datasets.broden",
    "netdissection.plugins.datasets.folder_dataset",
    "netdissection.plugins.datasets.hf_dataset",
    "netdissection.plugins.datasets.generated",
    "netdissection.plugins.datasets.data_commands",
    "netdissection.plugins.thresholds.quantile",
    "netdissection.plugins.reports.writers",
    "netdissection.plugins.reports.plots",  # before html_report: the page shows the plots when they are there
    "netdissection.plugins.reports.html_report",
    "netdissection.plugins.reports.report_command",
    "netdissection.plugins.executors.local",
    "netdissection.plugins.executors.ray_executor",
    "netdissection.plugins.explainers.compositional",
    "netdissection.compare.commands",
)

#: Each kind of component: its catalog name and the hook that fills it (a new kind is one line here).
COMPONENT_KINDS = {
    "backend": "dissect_register_backends",
    "dataset": "dissect_register_datasets",
    "threshold": "dissect_register_thresholds",
    "reporter": "dissect_register_reporters",
    "executor": "dissect_register_executors",
    "explainer": "dissect_register_explainers",
}


@dataclass
class PluginRecord:
    """What ``dissect plugins`` shows about one plugin: where it comes from, what it provides, every error."""

    name: str
    source: str  # "builtin", "python" (a plugin object) or the distribution that declares the entry point
    version: str
    provides: list[str] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return not any(f.where == "import" for f in self.failures)

    @property
    def errors(self) -> list[str]:
        return [f"{f.where}: {f.error}" for f in self.failures]

    @property
    def error(self) -> str | None:
        """Every error in one string (None when the plugin loaded and registered cleanly)."""
        return "; ".join(self.errors) or None


@dataclass
class Host:
    """A plugin manager with its catalogs and a record of every plugin, loaded or broken."""

    pm: pluggy.PluginManager
    catalogs: dict[str, Catalog[Any]]
    plugins: list[PluginRecord]
    runtime_log: RuntimeFailureLog = field(default_factory=RuntimeFailureLog)
    #: Whether the load failures were shown already (a command that runs several dissections shows them once).
    announced: bool = False

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def catalog(self, kind: str) -> Catalog[Any]:
        return self.catalogs[kind]

    def record(self, plugin: str) -> PluginRecord | None:
        return next((r for r in self.plugins if r.name == plugin), None)

    def plugin_versions(self) -> dict[str, str]:
        """Every plugin that loaded, with its version (for provenance)."""
        return {p.name: p.version for p in self.plugins if p.loaded}

    def load_failures(self) -> list[PluginFailure]:
        """Every failure met while the host was built: imports, registrations, commands."""
        return [f for p in self.plugins for f in p.failures]

    def record_failure(self, plugin: str, where: str, exc: BaseException) -> PluginFailure:
        failure = PluginFailure.of(plugin, where, exc)
        record = self.record(plugin)
        if record is not None:
            record.failures.append(failure)
        return failure

    def component(self, kind: str, name: str) -> Entry[Any]:
        """The ``kind`` component called ``name``. An unknown name fails with close matches and, when
        plugins failed to load or to register that kind, names them and their errors: the name may be theirs."""
        catalog = self.catalogs[kind]
        if name in catalog:
            return catalog.get(name)
        hook = COMPONENT_KINDS[kind]
        # A refused duplicate is not why a name is missing: only failed imports and registrations count.
        broken = [f for f in self.load_failures()
                  if f.where in ("import", hook) and not f.error.startswith(ConflictError.__name__)]
        note = "; ".join(f"{f.line()}" for f in broken[:3])
        if len(broken) > 3:
            note += f" and {len(broken) - 3} more (see: dissect plugins)"
        return catalog.get(name, note=note)

    def call_each(self, hook_name: str, *, strict: bool = False, firstresult: bool = False,
                  failures: list[PluginFailure] | None = None, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call each plugin's implementation of ``hook_name`` on its own, in pluggy's order; return the
        (plugin, answer) pairs that are not None (only the first with ``firstresult``).

        An implementation that raises is skipped, added to ``failures`` and reported (one warning line, or
        an error when ``strict``) unless the same failure is there already; a ``DissectionError`` is a user
        mistake and propagates. Outcomes go to the runtime log.
        """
        caller = getattr(self.pm.hook, hook_name)
        answers: list[tuple[str, Any]] = []
        succeeded: list[tuple[str, str]] = []
        failed: list[tuple[PluginFailure, str]] = []
        try:
            for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last-registered first
                if impl.hookwrapper or impl.wrapper:
                    continue
                try:
                    answer = impl.function(*[kwargs[name] for name in impl.argnames])
                except DissectionError:
                    raise
                except Exception as exc:
                    failure = PluginFailure.of(impl.plugin_name, hook_name, exc)
                    record = self.record(impl.plugin_name)
                    failed.append((failure, record.version if record else "?"))
                    if failures is not None and failure in failures:
                        continue  # the same failure again (a hook called per layer): shown once
                    if failures is not None:
                        failures.append(failure)
                    report(failure, strict=strict)
                    continue
                succeeded.append((impl.plugin_name, hook_name))
                if answer is not None:
                    answers.append((impl.plugin_name, answer))
                    if firstresult:
                        break
        finally:
            self.runtime_log.update(succeeded, failed)
        return answers

    def runtime_failures(self) -> list[dict[str, str]]:
        """Run-time failures of the installed plugins (same version) recorded by earlier runs."""
        versions = {p.name: p.version for p in self.plugins}
        return [e for e in self.runtime_log.entries() if versions.get(e.get("plugin", "")) == e.get("version")]


def _own_version() -> str:
    try:
        return metadata.version("netdissection")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        from ..core.version import __version__

        return __version__


def _load(name: str, source: str, version: str, loader: Callable[[], Any],
          pm: pluggy.PluginManager, records: list[PluginRecord]) -> None:
    record = PluginRecord(name=name, source=source, version=version)
    records.append(record)
    try:
        plugin = loader()
        pm.register(plugin, name=name)
    except Exception as exc:  # a broken plugin is recorded and skipped, never fatal
        record.failures.append(PluginFailure.of(name, "import", exc))


def build_host(*, entry_points: bool = True, extra_plugins: tuple[Any, ...] = (),
               runtime_log: RuntimeFailureLog | None = None) -> Host:
    """Build a fresh plugin host: load every plugin and fill the catalogs. Nothing is logged here: the
    failures are recorded on the plugins' records, and whoever uses the host shows them.

    ``extra_plugins`` (modules or objects with hook implementations) are registered after the built-ins
    and the entry points, as plugins named after their ``__name__`` (tests and the Python API use it to
    add a plugin without packaging it).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    records: list[PluginRecord] = []
    own = _own_version()

    for module_name in BUILTIN_PLUGINS:
        short = module_name.rsplit(".", 1)[-1]
        _load(short, "builtin", own, lambda m=module_name: importlib.import_module(m), pm, records)

    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if pm.has_plugin(ep.name) or any(r.name == ep.name for r in records):
                records.append(PluginRecord(ep.name, dist, version, failures=[PluginFailure(
                    ep.name, "import", f"NameTaken: the plugin name {ep.name!r} is already taken by another plugin")]))
                continue
            _load(ep.name, dist, version, ep.load, pm, records)

    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        _load(name, "python", getattr(plugin, "__version__", own), lambda p=plugin: p, pm, records)

    host = Host(pm=pm, catalogs={kind: Catalog(kind) for kind in COMPONENT_KINDS}, plugins=records,
                runtime_log=runtime_log if runtime_log is not None else RuntimeFailureLog())
    for kind, hook_name in COMPONENT_KINDS.items():
        _collect(host, kind, hook_name)
    return host


def _collect(host: Host, kind: str, hook_name: str) -> None:
    """Call each plugin's registration hook on its own, so that a component is attributed to its plugin and
    a plugin whose registration fails is recorded — every error of it — without losing the others."""
    catalog = host.catalogs[kind]
    caller = getattr(host.pm.hook, hook_name)
    for impl in caller.get_hookimpls():  # registration order (pluggy would call them in reverse)
        if impl.hookwrapper or impl.wrapper:
            continue
        plugin_name = impl.plugin_name

        def register(name: str, factory: Any, *, description: str = "", _p: str = plugin_name,
                     **meta: Any) -> None:
            # A refused registration is recorded, and the plugin's other registrations go on.
            if not isinstance(name, str) or not name:
                host.record_failure(_p, hook_name, TypeError(f"register() needs a non-empty name, not {name!r}"))
                return
            if not callable(factory):
                host.record_failure(_p, hook_name, TypeError(
                    f"the factory registered for {catalog.label} {name!r} is not callable"))
                return
            try:
                catalog.add(Entry(name=name, factory=factory, plugin=_p, description=description, metadata=meta))
            except ConflictError as exc:
                host.record_failure(_p, hook_name, exc)
                return
            record = host.record(_p)
            if record is not None:
                record.provides.append(f"{kind}:{name}")

        try:
            impl.function(*[{"register": register}[a] for a in impl.argnames])
        except Exception as exc:
            host.record_failure(plugin_name, hook_name, exc)
