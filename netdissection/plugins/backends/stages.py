"""``stage:N`` names and the choice of layers, shared by the torch backends.

A model's stages are the maps its own feature extraction returns, in order (timm's ``feature_info`` /
``forward_intermediates``, the return nodes torchvision's feature extraction uses). ``stage:N`` counts
them from 0, ``stage:-1`` from the end, so ``--layer stage:-1`` means "the last stage" of any
architecture; it is the default layer wherever a model has stages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ...core.errors import DissectionError, UnknownNameError
from ...core.types import LayerInfo

STAGE = "stage:"
_STAGE_NAME = re.compile(r"stage:(-?\d+)")


def stage_index(name: str) -> int | None:
    """N of a ``stage:N`` name (possibly negative), or None for any other name."""
    match = _STAGE_NAME.fullmatch(name.strip())
    return int(match.group(1)) if match else None


def stage_names(count: int) -> list[tuple[str, str]]:
    """For each of ``count`` stages in order, its two names: ``(stage:i, stage:i-count)``."""
    return [(f"{STAGE}{i}", f"{STAGE}{i - count}") for i in range(count)]


def stage_range(count: int) -> str:
    if count == 0:
        return "none"
    return f"stage:0 … stage:{count - 1}, or stage:-{count} … stage:-1 from the end"


def default_layer(infos: Sequence[LayerInfo], stages: int) -> str | None:
    """``stage:-1``, the last stage, when the model has stages — or the last stage that still has a map when
    a small input leaves the last one 1×1; else the last layer with a spatial map."""
    by_name = {i.name: i for i in infos}
    for index in range(-1, -stages - 1, -1):
        info = by_name.get(f"{STAGE}{index}")
        if info is not None and info.spatial:
            return info.name
    spatial = [i for i in infos if i.spatial]
    return spatial[-1].name if spatial else None


def select_layers(infos: Sequence[LayerInfo], requested: Sequence[str] | None, model_name: str, *,
                  stages: int, default: str | None, list_command: str,
                  elsewhere: Callable[[str], str] | None = None) -> list[str]:
    """The requested layers, checked, in order without repeats; with none, ``[default]``.

    Errors are one line each: an unknown name (with close matches), a stage index out of range, a layer
    that is no map (attention probabilities, a pooled vector, tokens off the model's grid) saying what it
    holds. ``elsewhere(name)`` may add where else the layer exists (e.g. ``--backend timm``).
    """
    by_name = {i.name: i for i in infos}
    if not requested:
        if default is None:
            raise DissectionError(f"{model_name} has no layer with a spatial map to dissect")
        return [default]
    layers: list[str] = []
    for name in requested:
        info = by_name.get(name)
        also = elsewhere(name) if elsewhere is not None and info is None else ""
        if info is None and stage_index(name) is not None:
            raise DissectionError(f"{name} is out of range: {model_name} has {stages} stage"
                                  f"{'' if stages == 1 else 's'} ({stage_range(stages)}){also}")
        if info is None:
            raise UnknownNameError(f"layer of {model_name}", name, list(by_name),
                                   hint=f"list them with: {list_command}", note=also.removeprefix("; "))
        if not info.spatial:
            raise DissectionError(f"layer {name!r} of {model_name} has no spatial map to dissect: it holds "
                                  f"{_holds(info)}; {_instead(name, by_name, list_command)}")
        if name not in layers:
            layers.append(name)
    return layers


def _holds(info: LayerInfo) -> str:
    if info.note:
        return info.note
    if info.kind in ("conv", "tokens", "channels_last"):
        return f"a {info.shape[1]}×{info.shape[2]} map (one position, no spatial extent)"
    return f"an output of shape {tuple(info.shape)}"


def _instead(name: str, by_name: dict[str, LayerInfo], list_command: str) -> str:
    """Suggest the nearest enclosing module with a map (a block's output rather than its attention weights)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = by_name.get(".".join(parts[:end]))
        if parent is not None and parent.spatial:
            return f"take the enclosing {parent.name!r} instead, or see: {list_command}"
    return f"pick a layer listed by: {list_command}"
