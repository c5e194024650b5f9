"""A plugin factory's parameters, checked against its signature before anything runs.

Threshold rules and explainers take their parameters by keyword (``--threshold-param``, ``--explain-param``);
an unknown or a missing one must fail in one line naming it, not as a ``TypeError`` after a pass."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .errors import DissectionError


def keyword_parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters a factory takes, and whether it takes ``**kwargs`` (unknown: take anything)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}, True
    named = {n: p for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def settle_parameters(what: str, flag: str, own: Mapping[str, inspect.Parameter], params: Mapping[str, Any],
                      takes_any: bool) -> dict[str, Any]:
    """The parameters a component runs with, its defaults included, once ``params`` are checked against
    ``own`` (the factory's parameters a user may set). ``what`` names the component (``explainer
    'compositional'``), ``flag`` the option that sets them (``--explain-param``)."""
    unknown = [k for k in params if k not in own]
    if unknown and not takes_any:
        takes = ", ".join(own) or "no parameters"
        raise DissectionError(f"{what} takes no parameter {unknown[0]!r} (it takes: {takes})")
    missing = [n for n, p in own.items() if p.default is p.empty and n not in params]
    if missing:
        raise DissectionError(f"{what} needs {flag} {missing[0]}=VALUE")
    recorded = {n: p.default for n, p in own.items() if p.default is not p.empty}
    recorded.update(params)
    return recorded
