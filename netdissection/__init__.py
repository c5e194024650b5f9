"""netdissection: label the units of vision networks with human concepts (Network Dissection).

The public API: :func:`dissect`, :data:`hookimpl` for plugins, and the result types.
"""

from __future__ import annotations

from typing import Any

from .core.errors import DissectionError
from .core.hookspecs import hookimpl
from .core.types import (
    BackendOptions,
    Concept,
    InputSpec,
    LayerInfo,
    LayerResult,
    RunResult,
    Sample,
    Vocabulary,
)

__version__ = "0.1.0"

# The package netdissection.compare imports no framework; importing it here (and binding the name to its
# function afterwards) keeps ``netdissection.compare(...)`` a function even once its submodules are imported.
from .compare import CompareTable, compare


def dissect(model: Any, **kwargs: Any) -> RunResult:
    """Dissect a model; see :func:`netdissection.core.run.dissect` for the options."""
    from .core.run import dissect as _dissect

    return _dissect(model, **kwargs)


def load_results(path: Any) -> RunResult:
    """Load a finished run from its output folder."""
    from .core.results import load_run

    return load_run(path)


__all__ = [
    "BackendOptions",
    "CompareTable",
    "Concept",
    "DissectionError",
    "InputSpec",
    "LayerInfo",
    "LayerResult",
    "RunResult",
    "Sample",
    "Vocabulary",
    "__version__",
    "compare",
    "dissect",
    "hookimpl",
    "load_results",
]
