"""netdissection: label the units of vision networks with human concepts (Network Dissection).

The public API — what users and third-party plugins import:

- :func:`dissect`, :func:`compare`, :func:`load_results`, :func:`write_reports`, :func:`open_dataset`,
  :func:`build_host`; :func:`prepare_job` for executor plugins that run a job's passes in their own workers;
- :data:`hookimpl` to mark a plugin's hook implementations (the hooks: ``netdissection.core.hookspecs``);
- the component protocols a plugin implements (:class:`Backend`, :class:`ConceptDataset`,
  :class:`ThresholdRule`, :class:`ReportWriter`) and the data they exchange (``netdissection.core.types``);
- :class:`DissectionError`, the one-line error for a user's mistake.

Importing it loads no framework: torch loads when a run starts.
"""

from __future__ import annotations

from .api import build_host, dissect, load_results, open_dataset, write_reports

# The package netdissection.compare imports no framework; importing it here (and binding the name to its
# function afterwards) keeps ``netdissection.compare(...)`` a function even once its submodules are imported.
from .compare import CompareTable, compare
from .compare.execution import prepare_job
from .core.errors import DissectionError
from .core.hookspecs import hookimpl
from .core.protocols import Backend, ConceptDataset, ReportWriter, ThresholdRule
from .core.types import (
    BackendOptions,
    Concept,
    Explanation,
    InputSpec,
    LayerInfo,
    LayerResult,
    RunResult,
    Sample,
    Vocabulary,
)
from .core.version import __version__

__all__ = [
    "Backend",
    "BackendOptions",
    "CompareTable",
    "Concept",
    "ConceptDataset",
    "DissectionError",
    "Explanation",
    "InputSpec",
    "LayerInfo",
    "LayerResult",
    "ReportWriter",
    "RunResult",
    "Sample",
    "ThresholdRule",
    "Vocabulary",
    "__version__",
    "build_host",
    "compare",
    "dissect",
    "hookimpl",
    "load_results",
    "open_dataset",
    "prepare_job",
    "write_reports",
]
