"""Compositional explanations of units (Mu & Andreas, "Compositional Explanations of Neurons", NeurIPS 2020).

``--explain compositional --formula-length 3 --beam 5`` labels each unit with the formula over concepts —
AND, OR, AND NOT — whose mask best matches the unit's, by a beam search:

1. the beam starts as the unit's ``beam`` best concepts (the tally's IoU; the first is its ordinary label);
2. each step reads the dataset once (``read``, the IoU pass with ``counts.FormulaCounts``) and scores
   ``F AND l``, ``F OR l`` and ``F AND NOT l`` for every formula F of the beam and every concept l, exactly,
   from counts of the masks (not from pairwise statistics): with ``|M ∩ F ∩ l|``, ``|F ∩ l|``, ``|M ∩ F|``,
   ``|F|`` from the read and ``|M ∩ l| = I``, ``|l| = G`` from the tally,

   * ``|M ∩ (F ∧ l)| = |M∩F∩l|``,   ``|F ∧ l| = |F∩l|``,
   * ``|M ∩ (F ∨ l)| = |M∩F| + |M∩l| − |M∩F∩l|``,   ``|F ∨ l| = |F| + |l| − |F∩l|``,
   * ``|M ∩ (F ∧ ¬l)| = |M∩F| − |M∩F∩l|``,   ``|F ∧ ¬l| = |F| − |F∩l|``;
3. the beam becomes the ``beam`` best of itself and the new formulas (formulas equal up to the order of
   AND-ed or OR-ed terms count once); after ``formula_length − 1`` steps its best formula is the answer.

The IoU of a formula F follows the paper's protocol: ``|M ∩ F| / (A_F + |F| − |M ∩ F|)``, where ``A_F`` is the
unit's mask area over the images that have the category of any concept of F (for one concept, the tally's
``A[u, pcat(l)]``, so a formula of length 1 scores exactly its tally IoU). Ties go to the formula that was
in the beam already (the shorter), then to the earlier beam entry, AND before OR before AND NOT, and the
lower label number.

``formula="..."`` scores that formula for every unit instead of searching (one read).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.errors import DissectionError
from ...core.explain import Read
from ...core.hookspecs import hookimpl
from ...core.scores import iou_matrix, unit_labels
from ...core.types import Explanation, LayerResult, Vocabulary
from .formulas import OPERATORS, Formula, Leaf, Node, canonical, leaves, length, parse, text

log = logging.getLogger(__name__)

DEFAULT_LENGTH = 3
DEFAULT_BEAM = 5


@dataclass(frozen=True)
class Scored:
    """A formula of a unit's beam with its exact counts: ``|M ∩ F|`` (``inter``) and its IoU."""

    formula: Formula
    iou: float
    inter: int
    key: tuple[object, ...]


class Compositional:
    """The explainer: ``formula_length`` (≥ 1) concepts at most, a beam of ``beam`` (≥ 1) formulas per unit;
    with ``formula``, that formula's IoU for every unit instead of a search."""

    def __init__(self, formula_length: int = DEFAULT_LENGTH, beam: int = DEFAULT_BEAM, formula: str | None = None,
                 compat: str = "paper") -> None:
        for option, value in (("--formula-length", formula_length), ("--beam", beam)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DissectionError(f"{option} takes a whole number, not {value!r}")
            if value < 1:
                raise DissectionError(f"{option} must be at least 1, not {value}")
        if compat != "paper":
            raise DissectionError("--explain compositional follows the paper's semantics; NetDissect-Lite had no "
                                  "formulas to reproduce: drop --compat lite")
        if formula is not None and (not isinstance(formula, str) or not formula.strip()):
            raise DissectionError("--explain-param formula=... takes a formula like 'red-c AND ball'")
        self.formula_length, self.beam, self.formula = int(formula_length), int(beam), formula
        self._given: Formula | None = None

    def check(self, vocabulary: Vocabulary) -> None:
        """A given formula must name concepts of the dataset."""
        if self.formula is not None:
            self._given = parse(self.formula, vocabulary)

    def explain(self, layers: Mapping[str, LayerResult], read: Read,
                units: Sequence[int] | None) -> dict[str, list[Explanation]]:
        if not layers:
            return {}
        vocabulary = next(iter(layers.values())).vocabulary
        if self.formula is not None:
            given = self._given if self._given is not None else parse(self.formula, vocabulary)
            return score_formula(given, layers, read, units)
        return beam_search(layers, read, units, self.formula_length, self.beam)


# ---- the search ----------------------------------------------------------------------------------------------


def first_beams(result: LayerResult, units: Sequence[int], beam: int) -> dict[int, list[Scored]]:
    """Each unit's ``beam`` best concepts by the tally's IoU (ties: the lower label number)."""
    iou = iou_matrix(result)
    concepts = np.flatnonzero(result.vocabulary.primary_category_index() >= 0)
    beams = {}
    for u in units:
        order = np.lexsort((concepts, -iou[u, concepts]))[:beam]
        beams[u] = [Scored(Leaf(int(label)), float(iou[u, label]), int(result.intersection[u, label]),
                           canonical(Leaf(int(label)))) for label in concepts[order]]
    return beams


def request_for(beams: Mapping[str, Mapping[int, Sequence[Scored]]]) -> tuple[Any, dict[str, list[tuple[int, int]]]]:
    """The read that counts every beam: its request, and per layer the (unit, beam position) of each slot."""
    from .counts import FormulaRequest

    distinct = sorted({entry.formula for per_unit in beams.values() for entry_list in per_unit.values()
                       for entry in entry_list}, key=lambda f: (leaves(f), repr(f)))
    index = {formula: j for j, formula in enumerate(distinct)}
    slots: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    places: dict[str, list[tuple[int, int]]] = {}
    for name, per_unit in beams.items():
        rows = sorted(((index[entry.formula], u, b) for u, entries in per_unit.items()
                       for b, entry in enumerate(entries)))
        slots[name] = (np.array([u for _, u, _ in rows], dtype=np.int64),
                       np.array([j for j, _, _ in rows], dtype=np.int64))
        places[name] = [(u, b) for _, u, b in rows]
    return FormulaRequest(tuple(distinct), slots), places


def expand(result: LayerResult, unit: int, entries: Sequence[Scored], slot_of: Mapping[int, int], counts: Any,
           formula_of: Sequence[int], partial: Any, beam: int) -> list[Scored]:
    """The unit's next beam: its entries and every ``F op l`` for F in them, scored exactly from one read."""
    category_of = result.vocabulary.primary_category_index()
    concept = category_of >= 0
    truth = result.truth.astype(np.int64)
    intersection = result.intersection[unit].astype(np.int64)
    labels = category_of.shape[0]
    scores = np.full((len(entries), len(OPERATORS), labels), -np.inf)
    inters = np.zeros((len(entries), len(OPERATORS), labels), dtype=np.int64)
    for b, entry in enumerate(entries):
        s = slot_of[b]
        j = formula_of[s]
        joint, inter = counts.joint[s].astype(np.int64), int(counts.inter[s])
        if inter != entry.inter:  # the read must agree with the step that scored F: a bug if not
            raise RuntimeError(f"formula counts disagree for {entry.formula}: {inter} != {entry.inter}")
        overlap, size = partial.overlap[j].astype(np.int64), int(partial.size[j])
        # The area term of F op l: the mask over F's domain and the images having l's category.
        activation = np.where(concept, counts.area[s][np.maximum(category_of, 0)], 0).astype(np.int64)
        candidates = ((joint, overlap),  # AND
                      (inter + intersection - joint, size + truth - overlap),  # OR
                      (inter - joint, size - overlap))  # AND NOT
        valid = concept.copy()
        valid[leaves(entry.formula)] = False  # a concept twice adds nothing new
        for o, (hits, extent) in enumerate(candidates):
            denominator = activation + extent - hits
            iou = np.zeros(labels)
            np.divide(hits, denominator, out=iou, where=denominator > 0)
            scores[b, o] = np.where(valid, iou, -np.inf)
            inters[b, o] = hits
    pool = np.concatenate([[e.iou for e in entries], scores.ravel()])
    chosen: list[Scored] = []
    seen: set[tuple[object, ...]] = set()
    for position in np.argsort(-pool, kind="stable"):
        if len(chosen) == beam or pool[position] == -np.inf:
            break
        if position < len(entries):
            scored = entries[position]
        else:
            b, o, label = np.unravel_index(position - len(entries), scores.shape)
            formula = Node(OPERATORS[o], entries[b].formula, Leaf(int(label)))
            scored = Scored(formula, float(pool[position]), int(inters[b, o, label]), canonical(formula))
        if scored.key in seen:
            continue
        seen.add(scored.key)
        chosen.append(scored)
    return chosen


def beam_search(layers: Mapping[str, LayerResult], read: Read, units: Sequence[int] | None, max_length: int,
                beam: int) -> dict[str, list[Explanation]]:
    """The best formula of at most ``max_length`` concepts for each unit (0-based ``units``; None: all)."""
    from .counts import FormulaCounts

    beams = {name: first_beams(result, range(result.units) if units is None else units, beam)
             for name, result in layers.items()}
    steps = max_length - 1
    for step in range(steps):
        request, places = request_for(beams)
        log.info("compositional search: step %d of %d, %d formulas over %d units", step + 1, steps,
                 len(request.formulas), sum(len(b) for b in beams.values()))
        partial = read(functools.partial(FormulaCounts, request), stage=f"explain {step + 1}/{steps}")
        for name, result in layers.items():
            counts = partial.layers[name]
            formula_of = request.slots[name][1]
            slots_of: dict[int, dict[int, int]] = {}
            for s, (u, b) in enumerate(places[name]):
                slots_of.setdefault(u, {})[b] = s
            beams[name] = {u: expand(result, u, entries, slots_of[u], counts, formula_of, partial, beam)
                           for u, entries in beams[name].items()}
    return {name: _rows(layers[name], {u: entries[0] for u, entries in per_unit.items()})
            for name, per_unit in beams.items()}


def score_formula(formula: Formula, layers: Mapping[str, LayerResult], read: Read,
                  units: Sequence[int] | None) -> dict[str, list[Explanation]]:
    """The IoU of one formula for each unit (one read)."""
    beams = {name: {u: [Scored(formula, 0.0, 0, canonical(formula))]
                    for u in (range(result.units) if units is None else units)} for name, result in layers.items()}
    from .counts import FormulaCounts

    request, places = request_for(beams)
    partial = read(functools.partial(FormulaCounts, request), stage="explain")
    category_of = next(iter(layers.values())).vocabulary.primary_category_index()
    domain = int(category_of[leaves(formula)[0]])  # any category of F: its domain already holds it
    size = int(partial.size[0])
    rows = {}
    for name, result in layers.items():
        counts = partial.layers[name]
        best = {}
        for s, (u, _) in enumerate(places[name]):
            inter = int(counts.inter[s])
            denominator = int(counts.area[s, domain]) + size - inter
            best[u] = Scored(formula, inter / denominator if denominator > 0 else 0.0, inter, canonical(formula))
        rows[name] = _rows(result, best)
    return rows


def _rows(result: LayerResult, best: Mapping[int, Scored]) -> list[Explanation]:
    names = result.vocabulary.names()
    labels, label_iou = unit_labels(result)
    return [Explanation(unit=u + 1, formula=text(s.formula, names), iou=s.iou, length=length(s.formula),
                        label=names[int(labels[u])], label_iou=float(label_iou[u])) for u, s in sorted(best.items())]


@hookimpl
def dissect_register_explainers(register) -> None:  # type: ignore[no-untyped-def]
    register("compositional", Compositional,
             description="formulas of concepts with AND, OR, AND NOT by beam search (Mu & Andreas 2020), exact "
                         "IoU; --formula-length N, --beam B, --units 1,5,9")
