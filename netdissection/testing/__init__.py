"""Testing netdissection plugins: contract checks for each kind of component, a reference implementation of
the counts, small seeded data, and a pytest plugin with fixtures.

Enable the fixtures in the ``conftest.py`` at the root of your tests::

    pytest_plugins = ["netdissection.testing"]

Fixtures: ``tiny_model``, ``tiny_broden_set``, ``tiny_folder_set``, ``tiny_run``, ``plugin_host``,
``dissect_cli``, ``isolated_cache``. Checks: :func:`check_backend`, :func:`check_dataset`,
:func:`check_threshold_rule`, :func:`check_report_writer`. Reference: :func:`reference_maps`,
:func:`reference_counts`.
"""

from __future__ import annotations

from .contracts import check_backend, check_dataset, check_report_writer, check_threshold_rule
from .data import TINY_LAYERS, tiny_model, write_tiny_broden, write_tiny_folder
from .fixtures import (
    CliResult,
    dissect_cli,
    isolated_cache,
    plugin_host,
    tiny_broden_set,
    tiny_folder_set,
    tiny_model_fixture,
    tiny_run,
)
from .reference import ReferenceCounts, reference_counts, reference_maps, upsample

__all__ = [
    "TINY_LAYERS",
    "CliResult",
    "ReferenceCounts",
    "check_backend",
    "check_dataset",
    "check_report_writer",
    "check_threshold_rule",
    "dissect_cli",
    "isolated_cache",
    "plugin_host",
    "reference_counts",
    "reference_maps",
    "tiny_broden_set",
    "tiny_folder_set",
    "tiny_model",
    "tiny_model_fixture",
    "tiny_run",
    "upsample",
    "write_tiny_broden",
    "write_tiny_folder",
]
