"""Comparison at scale: many dissections (architectures, checkpoints, layers) in one table.

``netdissection.compare(models, ...)`` (see :func:`netdissection.compare.api.compare`) and the
``dissect compare`` command. Jobs are keyed by content (``core/jobkey.py``) and kept in the results store
(``core/store.py``); executors are plugins (``dissect_register_executors``; contract in
:mod:`netdissection.compare.execution`). Importing this package imports no framework.
"""

from .api import CompareTable, compare

__all__ = ["CompareTable", "compare"]
