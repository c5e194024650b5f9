"""The paper's released results: reading NetDissect's schema and both counting rules reproduce its table."""

from __future__ import annotations

from pathlib import Path

import pytest

from netdissection.core.scores import count_detectors
from netdissection.plugins.reports.writers import read_tally

GOLDEN = Path(__file__).parent / "data" / "netdissect-2017"

# file: units, detectors (IoU ≥ 0.04), unique labels (one per unit), per-category unique (> 0.04)
TABLE = {
    "caffe_reference_imagenet.csv": (256, 97, 50, dict(object=21, scene=4, part=8, material=1, texture=23, color=4)),
    "caffe_reference_places205.csv": (256, 107, 60, dict(object=36, scene=12, part=8, material=1, texture=20,
                                                         color=2)),
    "caffe_reference_places365.csv": (256, 118, 72, dict(object=40, scene=13, part=9, material=2, texture=25,
                                                         color=2)),
    "ResNet-152-model_imagenet.csv": (2048, 1325, 197, dict(object=75, scene=89, part=23, material=8, texture=45,
                                                            color=2)),
    "ResNet-152-model_places365.csv": (2048, 1452, 278, dict(object=84, scene=188, part=26, material=5,
                                                             texture=42, color=2)),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_published_counts(name: str) -> None:
    units, detectors, unique, per_category = TABLE[name]
    categories, rows = read_tally(GOLDEN / name)
    assert categories == ["object", "color", "material", "scene", "texture", "part"]
    counts = count_detectors(rows, categories)
    assert counts.units == units
    assert counts.detectors == detectors
    assert counts.unique_labels == unique
    assert counts.paper_unique_by_category == per_category
    assert counts.paper_unique_total == sum(per_category.values())
    # Rows come by descending score, as NetDissect writes them.
    scores = [r.score for r in rows]
    assert scores == sorted(scores, reverse=True)
