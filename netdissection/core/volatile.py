"""What may differ between two runs of the same dissection: time stamps and durations, and only in the
named fields of ``summary.json`` listed here.

Everything else a run writes for analysis — each layer's tally.csv, thresholds.csv and counts.npz, and
the rest of summary.json — is byte for byte the same whenever the same model sees the same images with
the same options, whatever ``--workers`` (see the README for what ``--batch-size`` may change). The tests
strip exactly these fields and compare the rest byte for byte.
"""

from __future__ import annotations

import copy
from typing import Any

#: Paths of the fields of summary.json that hold time stamps or durations; ``*`` stands for every item of a
#: list. ``provenance.started``: when the run started; ``seconds``: the time per pass and for the reports;
#: ``layers.*.seconds``: the same, per layer.
VOLATILE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("provenance", "started"),
    ("seconds",),
    ("layers", "*", "seconds"),
)


def without_volatile(summary: dict[str, Any]) -> dict[str, Any]:
    """A copy of a summary.json's content without the :data:`VOLATILE_FIELDS`."""
    stripped = copy.deepcopy(summary)
    for path in VOLATILE_FIELDS:
        _drop(stripped, path)
    return stripped


def _drop(node: Any, path: tuple[str, ...]) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node if isinstance(node, list) else ():
            _drop(item, rest)
        return
    if not isinstance(node, dict) or head not in node:
        return
    if rest:
        _drop(node[head], rest)
    else:
        del node[head]
