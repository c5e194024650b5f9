"""Catalogs of named components, filled by the registration hooks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..core.errors import UnknownNameError

T = TypeVar("T")

#: How a kind of component is named in messages ("unknown threshold rule 'x'").
KIND_LABELS = {"threshold": "threshold rule", "reporter": "report writer", "dataset": "dataset format"}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: its factory, the plugin that gave it, and free-form metadata."""

    name: str
    factory: T
    plugin: str
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


class ConflictError(ValueError):
    """Two plugins registered the same name for the same kind of component."""


class Catalog(Generic[T]):
    """Components of one kind by name, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    @property
    def label(self) -> str:
        return KIND_LABELS.get(self.kind, self.kind)

    def add(self, entry: Entry[T]) -> None:
        """Add ``entry``; a name already taken is refused (the first registration stays)."""
        existing = self._entries.get(entry.name)
        if existing is not None:
            raise ConflictError(f"{self.label} {entry.name!r} is registered by both {existing.plugin!r} and "
                                f"{entry.plugin!r}; the first one ({existing.plugin!r}) is kept")
        self._entries[entry.name] = entry

    def get(self, name: str, note: str = "") -> Entry[T]:
        """The entry called ``name``; an unknown name fails with close matches (and ``note``)."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.label, name, self._entries, hint="", note=note) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)
