"""Explainers: labelling plugins that run once the thresholds are known (``--explain NAME``).

The ordinary label of a unit is one concept. An explainer labels units otherwise — with formulas over
concepts, say — from the layer's results (thresholds, I, G, A) and from further reads of the dataset:
``read(factory)`` runs the IoU pass again over every (map, labels) batch of every shard (maps from the
activation cache, or recomputed where there is none), counting into the accumulator ``factory`` builds in
each shard, and returns the shards' partials merged (``partial.merge(other)``; counts that add, so any
split of the dataset gives the same answer). A search of several steps reads once per step.

Its results are :class:`~netdissection.core.types.Explanation` rows per layer, saved as
``<layer>/explanations.csv`` beside the counts and read back with the run.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import DissectionError
from .files import atomic_write_text
from .parameters import keyword_parameters, settle_parameters
from .types import Explanation, LayerResult, Vocabulary

#: Each layer's explanations, in its folder.
EXPLANATIONS = "explanations.csv"
COLUMNS = ("unit", "formula", "iou", "length", "label", "label_iou")
#: Arguments the host gives an explainer factory whose signature names them (not user parameters).
EXPLAINER_CONTEXT = ("compat",)


class Read(Protocol):
    """One more read of every (map, labels) batch: ``read(factory, stage="explain") -> merged partial``.

    ``factory(thresholds, vocabulary, semantics, device)`` builds, in every shard, the accumulator the IoU
    pass feeds (``core.iou.CountsAccumulator``: ``add_truth``, ``add`` per layer, ``partial``); the
    partials of the shards are merged with their ``merge``. ``stage`` names the read in progress bars.
    A factory that travels to other processes must pickle (a module-level class, ``functools.partial``).
    """

    def __call__(self, factory: Callable[..., Any], stage: str = "explain") -> Any: ...


@runtime_checkable
class Explainer(Protocol):
    """Explains units of every layer of a run.

    Optional: ``check(vocabulary)``, called before any pass runs, refuses (``DissectionError``) what the
    explainer's parameters name that the concept set lacks (an unknown concept in a formula).
    """

    def explain(self, layers: Mapping[str, LayerResult], read: Read,
                units: Sequence[int] | None) -> Mapping[str, Sequence[Explanation]]:
        """The explanations of ``units`` (0-based; None: every unit) of each layer, one per unit, by unit."""
        ...


@dataclass(frozen=True)
class ExplainerChoice:
    """The explainer of a run: its name, the object, what provenance records, and the units to explain.

    ``params`` are the values it runs with, defaults included (so that naming a default changes no job key);
    ``units`` are 1-based unit numbers as the user gave them (None: every unit).
    """

    name: str
    explainer: Explainer
    params: Mapping[str, Any] = field(default_factory=dict)
    units: tuple[int, ...] | None = None
    plugin: str = ""

    def record(self) -> dict[str, Any]:
        """What provenance and the job key record."""
        return {"name": self.name, "plugin": self.plugin, "params": dict(self.params),
                "units": list(self.units) if self.units is not None else None}


def explainer_params(name: str, factory: Callable[..., Any], params: Mapping[str, Any], *,
                     compat: str = "paper") -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments to make the explainer with, and the parameters it runs with (defaults
    included), checked against the factory's signature: an unknown or missing parameter is one line."""
    params = dict(params)
    for reserved in EXPLAINER_CONTEXT:
        if reserved in params:
            raise DissectionError(f"--explain-param {reserved}=... is not an explainer parameter; use --{reserved}")
    named, takes_any = keyword_parameters(factory)
    own = {n: p for n, p in named.items() if n not in EXPLAINER_CONTEXT}
    recorded = settle_parameters(f"explainer {name!r}", "--explain-param", own, params, takes_any)
    kwargs = dict(params)
    if "compat" in named:
        kwargs["compat"] = compat
    return kwargs, recorded


def check_units(units: Sequence[int] | None, layers: Mapping[str, int]) -> None:
    """``units`` (1-based) must name units of every layer (``layers``: name -> its number of units)."""
    if units is None:
        return
    for name, count in layers.items():
        outside = [u for u in units if not 1 <= u <= count]
        if outside:
            raise DissectionError(f"--units {outside[0]}: layer {name!r} has {count} units (1..{count}); "
                                  "pick unit numbers in that range")


def parse_units(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"1,5,9"`` or ``"1-4,9"`` (or a sequence of ints) as sorted unique 1-based unit numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        numbers: list[int] = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            low, dash, high = part.partition("-")
            try:
                numbers += list(range(int(low), int(high) + 1)) if dash else [int(part)]
            except ValueError:
                raise DissectionError(f"--units takes unit numbers like 1,5,9 or 1-8, not {part!r}") from None
    else:
        try:
            numbers = [int(u) for u in value]
        except (TypeError, ValueError):
            raise DissectionError(f"explain_units takes unit numbers (1-based), not {value!r}") from None
    if not numbers:
        raise DissectionError("--units names no unit; give unit numbers like 1,5,9")
    low = min(numbers)
    if low < 1:
        raise DissectionError(f"--units {low}: units are numbered from 1, as in tally.csv")
    return tuple(sorted(set(numbers)))


# ---- the file ----------------------------------------------------------------------------------------------


def explanations_text(rows: Sequence[Explanation]) -> str:
    """``explanations.csv``: one row per explained unit, by unit; floats at full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=lambda r: r.unit):
        writer.writerow([row.unit, row.formula, repr(float(row.iou)), row.length, row.label,
                         repr(float(row.label_iou))])
    return out.getvalue()


def write_explanations(rows: Sequence[Explanation], path: Path) -> Path:
    return atomic_write_text(path, explanations_text(rows))


def read_explanations(path: Path) -> list[Explanation]:
    """Read an ``explanations.csv`` back."""
    with open(path, newline="", encoding="utf-8") as f:
        return [Explanation(unit=int(r["unit"]), formula=r["formula"], iou=float(r["iou"]), length=int(r["length"]),
                            label=r["label"], label_iou=float(r["label_iou"])) for r in csv.DictReader(f)]


def run_explainer(choice: ExplainerChoice, layers: Mapping[str, LayerResult], read: Read
                  ) -> dict[str, list[Explanation]]:
    """Run the explainer on the layers (the units checked against each layer first); its rows, by unit."""
    check_units(choice.units, {name: layer.units for name, layer in layers.items()})
    units = [u - 1 for u in choice.units] if choice.units is not None else None
    explained = choice.explainer.explain(layers, read, units)
    return {name: sorted(explained.get(name, ()), key=lambda r: r.unit) for name in layers}


def check_explainer(choice: ExplainerChoice, vocabulary: Vocabulary) -> None:
    """The explainer's own checks against the concept set (before any pass runs)."""
    check = getattr(choice.explainer, "check", None)
    if callable(check):
        check(vocabulary)
