"""From counts to scores: IoU, each unit's label, and the two ways of counting detectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .types import DETECTOR_IOU, LayerResult


def iou_matrix(result: LayerResult) -> np.ndarray:
    """IoU[u, l] = I / (A[u, pcat(l)] + G[l] − I), and 0 where the denominator is 0 or l is no concept."""
    category_of = result.vocabulary.primary_category_index()
    concept = category_of >= 0
    activation = np.zeros((result.units, category_of.shape[0]), dtype=np.float64)
    activation[:, concept] = result.activation[:, category_of[concept]]
    inter = result.intersection.astype(np.float64)
    denominator = activation + result.truth.astype(np.float64)[None, :] - inter
    iou = np.zeros_like(inter)
    np.divide(inter, denominator, out=iou, where=(denominator > 0) & concept[None, :])
    return iou


@dataclass(frozen=True)
class CategoryBest:
    """A unit's best concept within one category, with the counts behind its IoU."""

    label: int  # 0 when the category has no concept
    truth: int
    activation: int
    intersection: int
    iou: float


@dataclass(frozen=True)
class UnitScore:
    """One row of a tally: a unit (1-based), its best concept overall, and its best per category."""

    unit: int
    label: str
    category: str
    score: float
    per_category: dict[str, tuple[str, float]]  # category -> (best label name, its IoU)


def best_per_category(result: LayerResult, iou: np.ndarray | None = None) -> list[list[CategoryBest]]:
    """For every unit and every category (vocabulary order), the concept with the highest IoU.

    Ties go to the lower label number (``argmax`` returns the first maximum).
    """
    iou = iou_matrix(result) if iou is None else iou
    category_of = result.vocabulary.primary_category_index()
    units = np.arange(result.units)
    rows: list[list[CategoryBest]] = [[] for _ in range(result.units)]
    for c, _name in enumerate(result.vocabulary.categories):
        members = np.flatnonzero(category_of == c)
        activation = result.activation[:, c].tolist()
        if members.size == 0:
            for u in range(result.units):
                rows[u].append(CategoryBest(0, 0, activation[u], 0, 0.0))
            continue
        best = members[np.argmax(iou[:, members], axis=1)]  # all units at once
        columns = zip(best.tolist(), result.truth[best].tolist(), activation,
                      result.intersection[units, best].tolist(), iou[units, best].tolist(), strict=True)
        for row, (label, truth, act, inter, value) in zip(rows, columns, strict=True):
            row.append(CategoryBest(label, truth, act, inter, value))
    return rows


def unit_labels(result: LayerResult, iou: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's label number (best concept over all categories, ties to the lower number) and IoU."""
    iou = iou_matrix(result) if iou is None else iou
    concept = result.vocabulary.primary_category_index() >= 0
    masked = np.where(concept[None, :], iou, -np.inf)
    best = np.argmax(masked, axis=1)
    return best, iou[np.arange(result.units), best]


#: Where a layer result keeps its tally rows, beside the counts they were scored from (compared by identity:
#: counts are never changed in place, a new result or a reassigned field scores again). The reports ask for
#: the rows a dozen times a run (tally, summary, plots, page), each time tens of ms for Broden's vocabulary.
_SCORED = "_netdissection_unit_scores"


def unit_scores(result: LayerResult) -> list[UnitScore]:
    """The tally rows of a layer, by descending score (ties by unit)."""
    counts = (result.intersection, result.activation, result.truth, result.vocabulary)
    saved = result.__dict__.get(_SCORED)
    if saved is None or any(a is not b for a, b in zip(saved[0], counts, strict=True)):
        saved = result.__dict__[_SCORED] = (counts, _unit_scores(result))
    return list(saved[1])


def _unit_scores(result: LayerResult) -> list[UnitScore]:
    iou = iou_matrix(result)
    labels, scores = unit_labels(result, iou)
    per_cat = best_per_category(result, iou)
    names = result.vocabulary.names()
    cats = result.vocabulary.categories
    category_of = result.vocabulary.primary_category_index()
    rows = []
    for u in range(result.units):
        label = int(labels[u])
        rows.append(UnitScore(
            unit=u + 1,
            label=names[label],
            category=cats[category_of[label]] if category_of[label] >= 0 else "",
            score=float(scores[u]),
            per_category={c: (names[b.label], b.iou) for c, b in zip(cats, per_cat[u], strict=True)},
        ))
    rows.sort(key=lambda r: (-r.score, r.unit))
    return rows


@dataclass(frozen=True)
class DetectorCounts:
    """Detector counts of a layer by both rules.

    ``detectors``/``unique_labels``: the report rule (one label per unit, IoU ≥ threshold).
    ``per_category``: the paper's figures — for each category, units whose best IoU within the category
    exceeds the threshold (strictly) and the number of unique labels among them; a unit can count in
    several categories.
    """

    units: int
    detectors: int
    unique_labels: int
    detectors_by_category: dict[str, int]  # report rule, by the category of each unit's label
    unique_by_category: dict[str, int]  # report rule
    paper_units_by_category: dict[str, int]
    paper_unique_by_category: dict[str, int]

    @property
    def paper_unique_total(self) -> int:
        return sum(self.paper_unique_by_category.values())


def count_detectors(rows: Sequence[UnitScore], categories: Sequence[str],
                    threshold: float = DETECTOR_IOU) -> DetectorCounts:
    """Count detectors from tally rows by both rules (works on any NetDissect-format tally)."""
    detectors = [r for r in rows if r.score >= threshold]
    by_cat = {c: 0 for c in categories}
    unique_by_cat: dict[str, set[str]] = {c: set() for c in categories}
    for r in detectors:
        if r.category in by_cat:
            by_cat[r.category] += 1
            unique_by_cat[r.category].add(r.label)
    paper_units = {c: 0 for c in categories}
    paper_unique: dict[str, set[str]] = {c: set() for c in categories}
    for r in rows:
        for c in categories:
            label, iou = r.per_category.get(c, ("", 0.0))
            if iou > threshold:
                paper_units[c] += 1
                paper_unique[c].add(label)
    return DetectorCounts(
        units=len(rows),
        detectors=len(detectors),
        unique_labels=len({r.label for r in detectors}),
        detectors_by_category=by_cat,
        unique_by_category={c: len(s) for c, s in unique_by_cat.items()},
        paper_units_by_category=paper_units,
        paper_unique_by_category={c: len(s) for c, s in paper_unique.items()},
    )
