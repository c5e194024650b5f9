"""Each unit's top images against the definition: the k largest peaks, ties to the lower dataset index."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netdissection.core.topimages import TopImagesPartial


@settings(max_examples=150, deadline=None)
@given(images=st.integers(1, 30), units=st.integers(1, 4), k=st.integers(1, 6), levels=st.integers(1, 5),
       batches=st.integers(1, 6), shards=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_top_images_are_the_best_peaks_ties_to_the_lower_index(images: int, units: int, k: int, levels: int,
                                                               batches: int, shards: int, seed: int) -> None:
    """Maps with few distinct values (many ties), in shuffled batches and shards merged: the kept images,
    their peaks and their maps are the k best by (peak descending, index ascending)."""
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, levels, size=(images, units, 2, 3)).astype(np.float32)
    order = rng.permutation(images)
    partials = []
    for part in np.array_split(order, min(shards, images)):
        partial = TopImagesPartial.empty(units, k, (2, 3))
        for batch in np.array_split(part, min(batches, len(part))):
            partial.update(torch.from_numpy(maps[batch]), batch)
        partials.append(partial)
    merged = partials[0]
    for other in partials[1:]:
        merged = merged.merge(other)
    result = merged.result()
    peaks = maps.max(axis=(2, 3))
    for unit in range(units):
        best = sorted(range(images), key=lambda i: (-peaks[i, unit], i))[:k]
        assert result.indices[unit].tolist() == best
        np.testing.assert_array_equal(result.scores[unit], peaks[best, unit])
        np.testing.assert_array_equal(result.maps[unit], maps[best, unit])
