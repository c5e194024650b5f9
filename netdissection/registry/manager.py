"""Builds the plugin manager: built-in plugins and entry points, loaded the same way, each on its own."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..core import hookspecs
from ..core.hookspecs import PROJECT
from .catalog import Catalog, ConflictError, Entry

log = logging.getLogger(__name__)

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
    "netdissection.compare.commands",
)

COMPONENT_KINDS = {
    "backend": "dissect_register_backends",
    "dataset": "dissect_register_datasets",
    "threshold": "dissect_register_thresholds",
    "reporter": "dissect_register_reporters",
    "executor": "dissect_register_executors",
}


@dataclass
class PluginRecord:
    """What ``dissect plugins`` shows about one plugin."""

    name: str
    source: str  # "builtin" or the distribution that declares the entry point
    version: str
    provides: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Host:
    """A plugin manager with its catalogs and a record of every plugin, loaded or broken."""

    pm: pluggy.PluginManager
    catalogs: dict[str, Catalog[Any]]
    plugins: list[PluginRecord]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def catalog(self, kind: str) -> Catalog[Any]:
        return self.catalogs[kind]

    def plugin_versions(self) -> dict[str, str]:
        return {p.name: p.version for p in self.plugins if p.error is None}


def _own_version() -> str:
    try:
        return metadata.version("netdissection")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        from .. import __version__

        return __version__


def _load(name: str, source: str, version: str, loader: Callable[[], Any],
          pm: pluggy.PluginManager, records: list[PluginRecord]) -> None:
    record = PluginRecord(name=name, source=source, version=version)
    records.append(record)
    try:
        plugin = loader()
        pm.register(plugin, name=name)
    except Exception as exc:  # a broken plugin is recorded and skipped, never fatal
        record.error = f"{type(exc).__name__}: {exc}"
        log.warning("plugin %s failed to load: %s", name, record.error)


def build_host(*, entry_points: bool = True, extra_plugins: tuple[Any, ...] = ()) -> Host:
    """Build a fresh plugin manager, load every plugin, and fill the catalogs.

    ``extra_plugins`` are registered after the built-ins (tests and the Python API use it to add a
    plugin object without packaging it).
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
            if pm.get_plugin(ep.name) is not None:
                records.append(PluginRecord(ep.name, dist, version, error="name already taken by another plugin"))
                continue
            _load(ep.name, dist, version, ep.load, pm, records)

    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        _load(name, "python", getattr(plugin, "__version__", own), lambda p=plugin: p, pm, records)

    catalogs: dict[str, Catalog[Any]] = {kind: Catalog(kind) for kind in COMPONENT_KINDS}
    by_name = {r.name: r for r in records}
    for kind, hook_name in COMPONENT_KINDS.items():
        _collect(pm, kind, hook_name, catalogs[kind], by_name)
    return Host(pm=pm, catalogs=catalogs, plugins=records)


def _collect(pm: pluggy.PluginManager, kind: str, hook_name: str, catalog: Catalog[Any],
             records: dict[str, PluginRecord]) -> None:
    """Call each plugin's registration hook on its own, so a component is attributed to its plugin
    and a plugin whose registration raises is recorded without losing the others."""
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():  # registration order (pluggy calls them in reverse)
        plugin_name = impl.plugin_name
        record = records.get(plugin_name)

        def register(name: str, factory: Any, *, description: str = "", _p: str = plugin_name,
                     **meta: Any) -> None:
            catalog.add(Entry(name=name, factory=factory, plugin=_p, description=description, metadata=meta))
            if records.get(_p) is not None:
                records[_p].provides.append(f"{kind}:{name}")

        try:
            impl.function(register=register)
        except (Exception, ConflictError) as exc:
            message = f"{type(exc).__name__} in {hook_name}: {exc}"
            if record is not None:
                record.error = message
            log.warning("plugin %s: %s", plugin_name, message)
