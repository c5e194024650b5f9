"""Plugin discovery, catalogs of named components, failure containment, and listing."""

from .catalog import Catalog, ConflictError, Entry
from .failures import PluginFailure, PluginFailureError, RuntimeFailureLog, strict_plugins
from .manager import BUILTIN_PLUGINS, COMPONENT_KINDS, ENTRY_POINT_GROUP, Host, PluginRecord, build_host

__all__ = [
    "BUILTIN_PLUGINS",
    "COMPONENT_KINDS",
    "ENTRY_POINT_GROUP",
    "Catalog",
    "ConflictError",
    "Entry",
    "Host",
    "PluginFailure",
    "PluginFailureError",
    "PluginRecord",
    "RuntimeFailureLog",
    "build_host",
    "strict_plugins",
]
