"""Plugin discovery, catalogs of named components, and listing."""

from .catalog import Catalog, ConflictError, Entry
from .manager import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, Host, PluginRecord, build_host

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "Catalog",
    "ConflictError",
    "Entry",
    "Host",
    "PluginRecord",
    "build_host",
]
