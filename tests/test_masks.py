"""The IoU pass's counting (label sets, cells) against the protocol written out loop by loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netdissection.core import masks
from netdissection.core.iou import IoUAccumulator, prepare_labels
from netdissection.core.masks import AxisCells, floor_float32, label_sets
from netdissection.core.upsample import source_positions

from . import bruteforce

CATEGORIES = ["object", "part", "color"]


def _random_case(seed: int, images: int, units: int, map_shape: tuple[int, int], label_shape: tuple[int, int]
                 ) -> tuple[bruteforce.BruteDataset, list[np.ndarray]]:
    """Random maps and labels: label layers that repeat labels (the paper counts a pixel once), numbers
    outside the vocabulary, image-level labels, and maps with ties at source values."""
    rng = np.random.default_rng(seed)
    pcat = {1: "object", 2: "object", 3: "part", 4: "part", 5: "color", 6: "color", 7: "object"}
    sh, sw = label_shape
    layers, levels = [], []
    for _ in range(images):
        count = int(rng.integers(1, 4))
        image_layers = []
        for _ in range(count):
            # Regions, not noise: a few labels in blocks, some pixels unlabelled, some unknown (9).
            grid = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 9], size=(max(1, sh // 4), max(1, sw // 4)))
            layer = np.kron(grid, np.ones((4, 4), dtype=np.int64))[:sh, :sw]
            layer = np.pad(layer, ((0, sh - layer.shape[0]), (0, sw - layer.shape[1])), mode="edge")
            image_layers.append(layer.astype(np.int64))
        layers.append(image_layers)
        levels.append([int(v) for v in rng.choice([0, 5, 6, 7], size=int(rng.integers(0, 3)))])
    data = bruteforce.BruteDataset(CATEGORIES, pcat, {n: str(n) for n in pcat}, layers, levels,
                                   [label_shape] * images, [])
    maps = [rng.standard_normal((units, *map_shape)).astype(np.float32) for _ in range(images)]
    maps[0][0] = 1.0  # a constant map: every pixel ties with the threshold when the threshold is 1.0
    maps[1 % images][-1, 0, 0] = 5.0  # one high source value: a single hot corner
    return data, maps


def _counted(data: bruteforce.BruteDataset, maps: list[np.ndarray], thresholds: np.ndarray, lite: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = 10
    category_of = torch.full((size,), -1, dtype=torch.int64)
    for number, category in data.pcat.items():
        category_of[number] = CATEGORIES.index(category)
    k = max(len(layers) for layers in data.layers)
    sh, sw = data.label_shapes[0]
    stacked = torch.zeros(len(maps), k, sh, sw, dtype=torch.int32)
    for i, layers in enumerate(data.layers):
        for j, layer in enumerate(layers):
            stacked[i, j] = torch.from_numpy(layer)
    j = max(1, max(len(v) for v in data.image_labels))
    levels = torch.zeros(len(maps), j, dtype=torch.int64)
    for i, values in enumerate(data.image_labels):
        levels[i, : len(values)] = torch.tensor(values, dtype=torch.int64)
    semantics = "lite" if lite else "paper"
    acc = IoUAccumulator(torch.from_numpy(thresholds), category_of, len(CATEGORIES), semantics)
    truth = torch.zeros(size, dtype=torch.int64)
    # Two batches, so that counts add across batches with label sets numbered per batch.
    half = max(1, len(maps) // 2)
    for rows in (slice(0, half), slice(half, len(maps))):
        batch, batch_truth = prepare_labels(stacked[rows], levels[rows], category_of, len(CATEGORIES), semantics)
        acc.add(torch.from_numpy(np.stack(maps[rows])), batch)
        truth += batch_truth
    intersection, activation = acc.counts()
    return intersection, activation, truth


@pytest.mark.parametrize(("map_shape", "label_shape"), [
    ((7, 7), (112, 112)), ((14, 14), (112, 112)), ((3, 5), (17, 9)), ((16, 16), (8, 8)), ((7, 7), (113, 113)),
    ((1, 1), (8, 8)), ((8, 8), (8, 8)), ((7, 7), (21, 21)), ((2, 3), (7, 13)),
])
@pytest.mark.parametrize("lite", [False, True])
def test_counts_equal_the_brute_force(map_shape: tuple[int, int], label_shape: tuple[int, int], lite: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masks, "CHUNK_VALUES", 97)  # many chunks of pairs and of cells
    data, maps = _random_case(sum(map_shape) * 7 + sum(label_shape), 6, 4, map_shape, label_shape)
    expected = bruteforce.dissect(maps, data, q=0.2, lite=lite)
    thresholds = expected.thresholds.copy()
    thresholds[0] = 1.0  # the constant map ties everywhere: no pixel above
    expected = bruteforce.dissect(maps, data, lite=lite, thresholds=thresholds)
    intersection, activation, truth = _counted(data, maps, thresholds, lite)
    assert intersection.sum() > 0
    for (u, label), count in expected.intersection.items():
        assert intersection[u, label] == count, (u, label)
    assert intersection.sum() == sum(expected.intersection.values())
    for label, count in expected.truth.items():
        assert truth[label] == count, label
    for u in range(len(thresholds)):
        for c, name in enumerate(CATEGORIES):
            assert activation[u, c] == expected.activation.get((u, name), 0), (u, name)


def test_floor_float32_decides_strict_comparisons_exactly() -> None:
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-8, 8, 500),
                        rng.standard_normal(50).astype(np.float32).astype(np.float64),  # float32 values themselves
                        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45]])
    floor = floor_float32(torch.from_numpy(t)).numpy()
    assert floor.dtype == np.float32
    for value, low in zip(t, floor, strict=True):
        # The float32 values around t: each is above t exactly when it is above the floor.
        near = np.float32(value)
        candidates = [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf)),
                      low, np.nextafter(low, np.float32(np.inf))]
        for x in candidates:
            assert (float(x) > value) == (x > low), (value, x, low)


@pytest.mark.parametrize(("size_in", "size_out"), [(7, 112), (14, 112), (7, 113), (16, 8), (8, 8), (7, 21), (1, 8)])
def test_cells_cover_every_position_once(size_in: int, size_out: int) -> None:
    cells = AxisCells.of(size_in, size_out)
    lower, upper, weight = source_positions(size_in, size_out)
    positions = cells.positions[cells.positions >= 0]
    assert sorted(positions.tolist()) == list(range(size_out))
    for row in range(cells.positions.shape[0]):
        for col, position in enumerate(cells.positions[row].tolist()):
            if position < 0:
                assert torch.isnan(cells.weight_upper[row, col])
                continue
            assert cells.lower[row] == lower[position]
            assert cells.weight_upper[row, col] == weight[position]
            assert cells.upper[row] == (upper[position] if weight[position] > 0 else lower[position])
    # No cell is wider than the scale: the clamped edges are cells of their own.
    assert cells.positions.shape[1] <= max(1, -(-size_out // size_in))


def test_label_sets_hold_each_pixels_labels() -> None:
    rng = np.random.default_rng(3)
    flat = torch.from_numpy(rng.choice([0, 1, 2, 7, 11], size=(5, 3, 4 * 6)).astype(np.int32))
    sets = label_sets(flat, (4, 6), 12)
    ids = sets.ids.view(5, -1)
    for i in range(5):
        for p in range(24):
            assert sets.labels[ids[i, p]].tolist() == flat[i, :, p].tolist()
            assert sets.image[ids[i, p]] == i
    # Distinct: no two sets are the same labels of the same image.
    keys = {(int(sets.image[m]), tuple(sets.labels[m].tolist())) for m in range(sets.count)}
    assert len(keys) == sets.count
    # The sorted path (a key space too large for a table) numbers them the same way.
    original = masks.DENSE_KEYS
    try:
        masks.DENSE_KEYS = 1
        again = label_sets(flat, (4, 6), 12)
    finally:
        masks.DENSE_KEYS = original
    assert torch.equal(again.ids, sets.ids) and torch.equal(again.labels, sets.labels)


@pytest.mark.parametrize(("map_shape", "label_shape"), [
    ((7, 7), (112, 112)), ((14, 14), (112, 112)), ((1, 3), (8, 24)), ((2, 5), (4, 10)), ((7, 7), (113, 113)),
    ((112, 112), (112, 112)), ((5, 9), (5, 9)), ((5, 9), (5, 10)),
])
def test_corner_max_is_the_largest_of_each_cells_corners(map_shape: tuple[int, int], label_shape: tuple[int, int]
                                                         ) -> None:
    """Each cell's largest corner, read corner by corner, whichever way the plan computes it (the shifted
    plans of integer scales take a faster way)."""
    plan = masks.CellPlan.of(map_shape, label_shape, "cpu")
    maps = torch.from_numpy(np.random.default_rng(5).integers(-3, 4, size=(6, *map_shape)).astype(np.float32))
    got = plan.corner_max(maps)
    cy, cx = plan.cells
    assert got.shape == (6, cy, cx)
    for i in range(cy):
        for j in range(cx):
            corners = [maps[:, int(r), int(c)] for r in (plan.row_lower[i], plan.row_upper[i])
                       for c in (plan.col_lower[j], plan.col_upper[j])]
            torch.testing.assert_close(got[:, i, j], torch.stack(corners).amax(dim=0), rtol=0, atol=0)
    if map_shape in ((7, 7), (14, 14)) and label_shape == (112, 112):
        assert plan.shifted  # the way of resnet18's layer4 and layer3 at Broden's label size
    # Labels of the map's size (resnet18's conv1 at Broden's): each cell is one value, the map as it is.
    assert plan.identity == (map_shape == label_shape)
