"""Which layers of a model a job dissects: names as given, ``stage:*`` expanded, applied where they exist."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from ..core.errors import DissectionError
from ..core.types import LayerInfo

log = logging.getLogger(__name__)

#: Every stage of the model, in order: the backend's ``stage:0``, ``stage:1``, ... layers.
ALL_STAGES = "stage:*"
_STAGE = re.compile(r"stage:(\d+)")


def stages(infos: Sequence[LayerInfo]) -> list[str]:
    """The backend's ``stage:N`` layers (N ≥ 0), in stage order."""
    found = [(int(m.group(1)), i.name) for i in infos if (m := _STAGE.fullmatch(i.name))]
    return [name for _, name in sorted(found)]


def choose_layers(requested: Sequence[str], lenient: bool, infos: list[LayerInfo], model_name: str,
                  select: Callable[[Sequence[str] | None], list[str]]) -> list[str]:
    """The layers to dissect: the backend's default layer when none is requested; ``stage:*`` expanded to
    every stage. ``select`` checks the names as ``dissect MODEL`` does (the backend's rules and errors).

    ``lenient`` (``dissect compare``): a requested layer the model lacks is skipped (logged); only a model
    with none of them fails. Otherwise an unknown layer fails with close matches, as ``dissect MODEL`` does.
    """
    if not requested:
        return select(None)
    expanded: list[str] = []
    for name in requested:
        if name != ALL_STAGES:
            expanded.append(name)
            continue
        found = stages(infos)
        if not found and not lenient:
            raise DissectionError(f"{model_name} has no stage:N layers to expand {ALL_STAGES} into; name its "
                                  f"layers with --layer (list them with: dissect layers {model_name})")
        expanded.extend(found)
    if lenient:
        by_name = {i.name: i for i in infos}
        kept = [n for n in expanded if n in by_name and by_name[n].spatial]
        skipped = [n for n in dict.fromkeys(expanded) if n not in kept]
        if not kept:
            raise DissectionError(f"{model_name} has none of the layers {', '.join(requested)}; list its layers "
                                  f"with: dissect layers {model_name}")
        if skipped:
            log.info("%s has no layer %s with a spatial map: dissecting %s", model_name, ", ".join(skipped),
                     ", ".join(dict.fromkeys(kept)))
        expanded = kept
    return select(expanded)
