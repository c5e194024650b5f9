"""Plugin failures: what one looks like, how it is shown, and the record of run-time failures that
``dissect plugins`` shows after the run that met them has ended."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import DissectionError
from ..core.files import atomic_write_text, cache_root

#: One line per plugin failure goes to this logger (the CLI prints it as a one-line warning).
failure_log = logging.getLogger("netdissection.plugin_failures")

STRICT_ENV = "NETDISSECTION_STRICT_PLUGINS"
FAILURES_FILE = "plugin-failures.json"
STRICT_HINT = f"--strict-plugins or {STRICT_ENV}=1 make plugin failures errors"


@dataclass(frozen=True)
class PluginFailure:
    """One failure of one plugin: where (``import``, a hook name, ``report writer 'x'``) and the error."""

    plugin: str
    where: str
    error: str  # "ExceptionType: message"

    @classmethod
    def of(cls, plugin: str, where: str, exc: BaseException) -> PluginFailure:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return cls(plugin, where, f"{type(exc).__name__}: {message}" if message else type(exc).__name__)

    def line(self) -> str:
        verb = "failed to load" if self.where == "import" else f"failed in {self.where}"
        return f"plugin {self.plugin!r} {verb} ({self.error})"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class PluginFailureError(DissectionError):
    """A plugin failed while plugin failures are errors (``--strict-plugins``)."""


def strict_plugins(flag: bool | None = None) -> bool:
    """Whether plugin failures are errors: ``flag`` when given, else ``$NETDISSECTION_STRICT_PLUGINS``."""
    if flag is not None:
        return flag
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def report(failure: PluginFailure, *, strict: bool, going_on: str = "going on without it") -> None:
    """Show one failure: an error (raised) when strict, else one warning line."""
    if strict:
        raise PluginFailureError(f"{failure.line()}; {STRICT_HINT}")
    failure_log.warning("%s; %s (see: dissect plugins)", failure.line(), going_on)


def raise_if_strict(failures: Iterable[PluginFailure], strict: bool) -> None:
    """In strict mode, the failures recorded so far (loading, registration) as one error line."""
    failures = list(failures)
    if not strict or not failures:
        return
    first = failures[0].line()
    more = f" and {len(failures) - 1} more plugin failure(s)" if len(failures) > 1 else ""
    raise PluginFailureError(f"{first}{more}; {STRICT_HINT} (see: dissect plugins)")


class RuntimeFailureLog:
    """The last outcome of each (plugin, hook or writer) that failed at run time, kept in the cache folder.

    A failure is recorded when it happens and forgotten when the same plugin's same hook next succeeds,
    so ``dissect plugins`` can say which plugin broke the last runs. Written only when it changes.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else cache_root() / FAILURES_FILE
        self._entries: list[dict[str, str]] | None = None

    def entries(self) -> list[dict[str, str]]:
        if self._entries is None:
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = [e for e in loaded if isinstance(e, dict)] if isinstance(loaded, list) else []
            except (OSError, ValueError):
                self._entries = []
        return self._entries

    def update(self, succeeded: Iterable[tuple[str, str]], failed: Iterable[tuple[PluginFailure, str]]) -> None:
        """Forget the (plugin, where) pairs that ran fine; record each failure with its plugin's version."""
        entries = self.entries()
        before = list(entries)
        done = set(succeeded)
        failed = list(failed)
        again = {(f.plugin, f.where) for f, _ in failed}
        entries[:] = [e for e in entries if (e.get("plugin"), e.get("where")) not in done | again]
        when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        entries.extend({**f.as_dict(), "version": version, "when": when} for f, version in failed)
        if entries != before:
            try:
                atomic_write_text(self.path, json.dumps(entries, indent=1) + "\n")
            except OSError as exc:  # a read-only cache costs the record, never the run
                logging.getLogger(__name__).debug("cannot record plugin failures in %s: %s", self.path, exc)
