"""Errors a user can fix. The CLI prints their message on one line and exits with status 2."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a stranger's file name, ...) shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, stripped, or its type's name when it has none: what a
    one-line error can quote of a library's many-line one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class DissectionError(Exception):
    """A mistake in the user's input: the message names the thing and the fix.

    Its text is one line whatever it quotes: names and values from a stranger's file may hold newlines.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())


class UnknownNameError(DissectionError, KeyError):
    """A name that no catalog, model zoo or graph knows; the message suggests close matches."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "", note: str = "") -> None:
        known = list(known)
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        if not close:
            # Prefix and substring matches catch "layer" → "layer1", "layer2", ... where difflib scores low.
            close = [k for k in known if name.lower() in k.lower()][:5]
        message = f"unknown {kind} {name!r}"
        if close:
            message += f"; did you mean {', '.join(repr(c) for c in close)}?"
        elif hint:
            message += f"; {hint}"
        elif len(known) <= 12:
            message += f"; known: {', '.join(known) or '(none)'}"
        if note:  # e.g. which plugin failed to register the missing name
            message += f"; {note}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return one_line(str(self.args[0]))


class MissingExtraError(DissectionError):
    """A component needs an optional dependency that is not installed."""

    def __init__(self, component: str, package: str, extra: str) -> None:
        super().__init__(
            f"{component} needs the package {package!r}; install it with: pip install 'netdissection[{extra}]'"
        )


def refuse_options(options: dict[str, object], what: str) -> None:
    """Fail when options that ``what`` does not take were given, naming them as the CLI spells them."""
    if options:
        names = ", ".join("--" + k.replace("_", "-") for k in options)
        raise DissectionError(f"{names} does not apply to {what}")
