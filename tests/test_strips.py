"""The image strips: the fast way of drawing them gives the pixels of the plain way, on every core alike."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from netdissection.core.errors import DissectionError
from netdissection.core.types import LayerResult, RunResult
from netdissection.plugins.reports.overlay import boxed_mask, unit_mask, upsample_bilinear
from netdissection.plugins.reports.parallel import can_fork, run_tasks
from netdissection.plugins.reports.strips import (
    ImageSource,
    StripJob,
    compose_strip,
    render_strip,
    shrink,
    tile_size,
    unit_overlays,
    unit_tiles,
    write_strips,
)

from .report_data import SmallRun, generated_set, synthetic_run


@pytest.fixture(scope="module")
def run_224(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """64 units over 24 generated images of 224 px: tiles of 112 px, each the average of 2×2 image pixels."""
    root = tmp_path_factory.mktemp("strips")
    return synthetic_run(generated_set(root / "set", images=24, image_size=224), units=64, k=10)


def plain_strip(layer: LayerResult, unit: int, images: ImageSource, tile: int) -> np.ndarray:
    """The reference: every overlay drawn whole, each shrunk on its own, pasted into the strip."""
    overlays, _ = unit_overlays(layer, unit, images, tile=tile, top_k=None)
    return np.asarray(compose_strip(overlays, tile_size([o.shape for o in overlays], tile)))


def fast_strip(layer: LayerResult, unit: int, images: ImageSource, tile: int, cached: bool) -> np.ndarray:
    pictures = [(slot, index, images(index)) for slot, index in unit_tiles(layer, unit, None)]
    return np.asarray(render_strip(layer, unit, pictures, tile, images if cached else None))


def test_fast_strips_are_the_plain_strips_shrunk_by_two(run_224: RunResult) -> None:
    layer = run_224.layers["layer4"]
    images = ImageSource(run_224.dataset)
    edges = 0
    for unit in range(layer.units):
        expected = plain_strip(layer, unit, images, tile=112)
        assert expected.shape == (112, 10 * 112 + 9 * 2, 3)
        np.testing.assert_array_equal(fast_strip(layer, unit, images, 112, cached=True), expected)
        np.testing.assert_array_equal(fast_strip(layer, unit, images, 112, cached=False), expected)
        for slot, index in unit_tiles(layer, unit, None):
            mask = unit_mask(layer.top_images.maps[unit, slot], float(layer.thresholds[unit]),  # type: ignore[union-attr]
                             images(index).shape[:2])
            edges += bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert edges > 10  # not vacuous: masks that reach the image's edge, where the box meets the border


@settings(max_examples=300, deadline=None)
@given(raw=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 9)),
                      elements=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 3.5])),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)), cut=st.floats(0.0, 1.0))
def test_boxed_mask_is_the_whole_mask_in_its_box(raw: np.ndarray, size: tuple[int, int], cut: float) -> None:
    """The windowed mask a strip draws is the whole upsampled map above the threshold, inside the mask's
    bounding box grown by a pixel (clamped to the image), and nothing outside it."""
    threshold = float(np.quantile(raw, cut))  # often a map value itself: the strict > matters
    whole = upsample_bilinear(raw, size) > threshold
    np.testing.assert_array_equal(unit_mask(raw, threshold, size), whole)
    boxed = boxed_mask(raw, threshold, size)
    if not whole.any():
        assert boxed is None
        return
    assert boxed is not None
    (rows, cols), inside = boxed
    ys, xs = np.flatnonzero(whole.any(axis=1)), np.flatnonzero(whole.any(axis=0))
    assert (rows.start, rows.stop) == (max(ys[0] - 1, 0), min(ys[-1] + 2, size[0]))
    assert (cols.start, cols.stop) == (max(xs[0] - 1, 0), min(xs[-1] + 2, size[1]))
    np.testing.assert_array_equal(inside, whole[rows, cols])


@pytest.mark.parametrize("tile", [224, 75, 56])
def test_fast_strips_at_other_scales(run_224: RunResult, tile: int) -> None:
    """Kept whole (factor 1), shrunk by a fraction (the plain way is taken), by four."""
    layer = run_224.layers["layer4"]
    images = ImageSource(run_224.dataset)
    for unit in range(0, layer.units, 9):
        np.testing.assert_array_equal(fast_strip(layer, unit, images, tile, cached=True),
                                      plain_strip(layer, unit, images, tile))


def test_fast_strips_of_a_real_run(small_run: SmallRun) -> None:
    """64 px images in 64 px tiles: the overlays kept as drawn, next to each other."""
    layer = small_run.result.layers["layer3"]
    images = ImageSource(small_run.result.dataset)
    for unit in range(0, layer.units, 16):
        np.testing.assert_array_equal(fast_strip(layer, unit, images, 112, cached=True),
                                      plain_strip(layer, unit, images, 112))


def test_strips_in_worker_processes_equal_strips_here(run_224: RunResult, tmp_path: Path) -> None:
    layer = run_224.layers["layer4"]
    written = {}
    for workers in (1, 2):
        jobs = [StripJob(layer, tmp_path / f"w{workers}")]
        (strips,) = write_strips(jobs, ImageSource(run_224.dataset), tile=112, quality=72, top_k=None,
                                 workers=workers)
        assert not isinstance(strips, Exception)
        assert sorted(strips) == list(range(layer.units))
        written[workers] = strips
    for unit, strip in written[1].items():
        other = written[2][unit]
        assert (strip.width, strip.height, strip.tiles) == (other.width, other.height, other.tiles)
        assert strip.path.read_bytes() == other.path.read_bytes()
        assert Image.open(strip.path).size == (strip.width, strip.height)


def three_most_shown(layer: LayerResult) -> list[int]:
    """The dataset indices of the three images the most units of ``layer`` show, ascending (checked untied)."""
    assert layer.top_images is not None
    shown = np.bincount(layer.top_images.indices[layer.top_images.indices >= 0])
    most = np.argsort(-shown, kind="stable")[:3]
    assert shown[most[-1]] > np.sort(shown)[-4]  # the three are not tied with a fourth
    return sorted(most.tolist())


def kept(source: ImageSource, run: RunResult) -> list[int]:
    """The dataset indices of the images ``source`` keeps decoded."""
    return [i for i in range(len(run.dataset)) if i in source]


@pytest.mark.skipif(not can_fork(), reason="the preload is what forked workers share")
def test_the_preload_keeps_the_images_most_units_show(run_224: RunResult, tmp_path: Path) -> None:
    """With room for three images, the three shown by the most units are decoded before the workers fork."""
    layer = run_224.layers["layer4"]
    most = three_most_shown(layer)
    source = ImageSource(run_224.dataset, budget_bytes=3 * 224 * 224 * 3)
    (strips,) = write_strips([StripJob(layer, tmp_path)], source, tile=112, quality=72, top_k=None, workers=2)
    assert not isinstance(strips, Exception) and len(strips) == layer.units
    assert kept(source, run_224) == most


def test_strips_drawn_past_the_budget_are_the_same_and_keep_the_preload(
        run_224: RunResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn here with room for three images and no more: every other image (and every tile) is made again
    where it is needed, the same strips come out, and the three most shown images stay kept throughout."""
    from netdissection.plugins.reports import strips as strips_module

    layer = run_224.layers["layer4"]
    most = three_most_shown(layer)
    (roomy,) = write_strips([StripJob(layer, tmp_path / "roomy")], ImageSource(run_224.dataset), tile=112,
                            quality=72, top_k=None, workers=1)
    monkeypatch.setattr(strips_module, "PER_WORKER_BYTES", 0)
    source = ImageSource(run_224.dataset, budget_bytes=3 * 224 * 224 * 3)
    (tight,) = write_strips([StripJob(layer, tmp_path / "tight")], source, tile=112, quality=72, top_k=None,
                            workers=1)
    assert not isinstance(roomy, Exception) and not isinstance(tight, Exception)
    assert kept(source, run_224) == most
    for unit, strip in roomy.items():
        assert tight[unit].tiles == strip.tiles
        assert tight[unit].path.read_bytes() == strip.path.read_bytes()


def test_a_layer_with_a_bad_image_costs_only_its_strips(run_224: RunResult, tmp_path: Path) -> None:
    layer = run_224.layers["layer4"]
    bad = int(layer.top_images.indices[5, 0])  # type: ignore[union-attr]

    class Broken:
        def __init__(self, dataset: object) -> None:
            self.dataset = dataset

        def load(self, index: int, **kwargs: object) -> object:
            if index == bad:
                raise DissectionError(f"image {index} is corrupt")
            return self.dataset.load(index, **kwargs)  # type: ignore[attr-defined]

    keep = np.flatnonzero(~(layer.top_images.indices == bad).any(axis=1))  # type: ignore[union-attr]
    clean = LayerResult(layer="clean", vocabulary=layer.vocabulary, thresholds=layer.thresholds[keep],
                        intersection=layer.intersection[keep], truth=layer.truth, activation=layer.activation[keep],
                        top_images=type(layer.top_images)(layer.top_images.indices[keep],  # type: ignore[union-attr]
                                                          layer.top_images.scores[keep],  # type: ignore[union-attr]
                                                          layer.top_images.maps[keep]))  # type: ignore[union-attr]
    outcomes = write_strips([StripJob(layer, tmp_path / "bad"), StripJob(clean, tmp_path / "clean")],
                            ImageSource(Broken(run_224.dataset)), tile=112, quality=72, top_k=None, workers=2)
    assert isinstance(outcomes[0], DissectionError) and f"image {bad} is corrupt" in str(outcomes[0])
    assert not isinstance(outcomes[1], Exception) and len(outcomes[1]) == len(keep) > 0


def test_tasks_run_in_other_processes_in_order() -> None:
    results = run_tasks([lambda i=i: (i, os.getpid()) for i in range(9)], workers=2)
    assert [i for i, _pid in results] == list(range(9))
    if can_fork():
        assert os.getpid() not in {pid for _i, pid in results}
    assert run_tasks([lambda: os.getpid()], workers=2) == [os.getpid()]  # one task: no pool
    assert run_tasks([lambda: os.getpid()] * 2, workers=1) == [os.getpid()] * 2


def test_a_task_error_reaches_the_caller() -> None:
    def fail() -> None:
        raise DissectionError("image 3 is corrupt")

    with pytest.raises(DissectionError, match="image 3 is corrupt"):
        run_tasks([lambda: 1, fail, lambda: 2], workers=2)


def _tasks_in_a_daemon(_: int) -> list[int]:
    return run_tasks([lambda: os.getpid()] * 2, workers=2)


def test_tasks_in_a_pool_worker_run_there() -> None:
    """A multiprocessing pool's worker (daemonic) may not have children: its tasks run in it."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        pids = pool.map(_tasks_in_a_daemon, [0])[0]
    assert len(set(pids)) == 1 and pids[0] != os.getpid()


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_shrink_is_pillows_reduce(factor: int) -> None:
    rng = np.random.default_rng(factor)
    for shape in [(factor, factor), (6 * factor, 2 * factor), (224 // factor * factor, 224 // factor * factor)]:
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        pixels[0] = 255  # the largest sums round too
        np.testing.assert_array_equal(shrink(pixels, factor), np.asarray(Image.fromarray(pixels).reduce(factor)))
