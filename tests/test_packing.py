"""A loader worker's batch crosses to the main process as one shared block: the same values, one segment."""

from __future__ import annotations

import pickle
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing  # registers with ForkingPickler how tensors cross processes
from hypothesis import given, settings
from hypothesis import strategies as st

from netdissection.api import resolve_dataset
from netdissection.core import loading
from netdissection.core.iou import LabelBatch, LabelPreparation, TallyCounts, prepare_labels
from netdissection.core.masks import LabelSets
from netdissection.core.packing import ALIGNMENT, packed, unpacked
from netdissection.core.scheduler import threads_beside
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.registry import build_host

DTYPES = [torch.uint8, torch.bool, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    seed = draw(st.integers(0, 2**16))
    values = torch.from_numpy(np.random.default_rng(seed).integers(-100, 100, size=shape)).to(dtype)
    if len(shape) >= 2 and draw(st.booleans()):
        values = values.transpose(0, 1)  # not contiguous: it arrives contiguous, with the same values
    return values


structures = st.recursive(st.one_of(tensors(), st.integers(), st.text(max_size=5), st.none()),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.text(max_size=3), inner, max_size=3),
                                                  st.tuples(inner, inner)), max_leaves=12)


def assert_same(got: object, expected: object) -> None:
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert_same(a, b)
    else:
        assert got == expected


@settings(max_examples=60, deadline=None)
@given(structures)
def test_any_structure_comes_back_whole_with_its_tensors_in_one_block(value: object) -> None:
    payload, block, layout = packed(value)
    assert block.is_shared() and block.dtype == torch.uint8
    assert all(offset % ALIGNMENT == 0 for _, _, offset in layout)
    # Through the pickling a worker's queue uses, as far as this process goes.
    again = unpacked(*pickle.loads(ForkingPickler.dumps((payload, block, layout))))
    assert_same(again, value)
    storages = {t.untyped_storage().data_ptr() for t in _tensors_in(again)}
    assert len(storages) <= 1


def _tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _label_tensors(labels: LabelBatch, truth: torch.Tensor) -> list[torch.Tensor]:
    assert labels.sets is not None and labels.truth is not None
    return [labels.layers, labels.image_labels, labels.has_category, labels.truth, labels.sets.ids,
            labels.sets.labels, labels.sets.image, truth]


def test_a_workers_batch_is_the_batch_made_here_in_one_shared_block(tmp_path: Path) -> None:
    root = generate_concept_set(tmp_path / "set", images=12, image_size=32, seed=0)
    dataset = resolve_dataset(build_host(entry_points=False), str(root), None, None)
    vocabulary = dataset.vocabulary
    prepare = LabelPreparation(vocabulary.primary_category_index(), len(vocabulary.categories), "paper")

    def batches(workers: int) -> list[loading.Batch]:
        return list(loading.iterate(dataset, batch_size=5, workers=workers, image=True, labels=True,
                                    skip_bad=False, prepare=prepare))

    here, crossed = batches(0), batches(2)
    assert [len(b.indices) for b in crossed] == [5, 5, 2]
    for ours, theirs in zip(here, crossed, strict=True):
        # The prepared labels replace the raw ones, which would cross a second time.
        assert theirs.layers is None and theirs.image_labels is None and ours.layers is None
        assert np.array_equal(ours.indices, theirs.indices) and torch.equal(ours.images, theirs.images)
        mine, sent = _label_tensors(*ours.prepared), _label_tensors(*theirs.prepared)
        for a, b in zip(mine, sent, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert theirs.images.untyped_storage().is_shared()
        assert len({t.untyped_storage().data_ptr() for t in [theirs.images, *sent]}) == 1

    # For the tally, whose counting reads only the label sets, the label layers stay in the worker.
    prepare = replace(prepare, keep_layers=TallyCounts.needs_label_layers)
    for ours, theirs in zip(here, batches(2), strict=True):
        assert theirs.prepared[0].layers is None
        mine, sent = _label_tensors(*ours.prepared)[1:], _label_tensors(*theirs.prepared)[1:]
        for a, b in zip(mine, sent, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_rows_of_prepared_labels_are_those_rows_prepared() -> None:
    rng = np.random.default_rng(4)
    layers = torch.from_numpy(rng.choice([0, 1, 2, 3, 5, 9], size=(6, 3, 4, 5)).astype(np.int32))
    levels = torch.from_numpy(rng.choice([0, 4, 5], size=(6, 2)).astype(np.int64))
    category_of = torch.tensor([-1, 0, 0, 1, 1, 2, -1], dtype=torch.int64)
    keep = torch.tensor([True, False, True, True, False, True])
    for semantics in ("paper", "lite"):
        prepared, _ = prepare_labels(layers, levels, category_of, 3, semantics)
        expected, expected_truth = prepare_labels(layers[keep], levels[keep], category_of, 3, semantics)
        rows, truth = prepared.rows(keep)
        assert torch.equal(truth, expected_truth)
        for got, want in ((rows.layers, expected.layers), (rows.image_labels, expected.image_labels),
                          (rows.has_category, expected.has_category), (rows.truth, expected.truth)):
            assert torch.equal(got, want)
        sets, want_sets = rows.label_sets(7), expected.label_sets(7)
        assert isinstance(sets, LabelSets) and torch.equal(sets.ids, want_sets.ids)
        assert torch.equal(sets.labels, want_sets.labels) and torch.equal(sets.image, want_sets.image)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**16), st.sampled_from(["paper", "lite"]), st.data())
def test_the_rows_of_labels_sent_without_their_layers_are_those_rows_prepared(
        n: int, k: int, seed: int, semantics: str, data: st.DataObject) -> None:
    """A batch prepared for the tally crosses with its label sets and without the label layers they were made
    from; the rows of it that the activation pass read have the very sets of those rows prepared anew."""
    rng = np.random.default_rng(seed)
    layers = torch.from_numpy(rng.choice([0, 1, 2, 3, 5, 9], size=(n, k, 3, 4)).astype(np.int32))
    levels = torch.from_numpy(rng.choice([0, 4, 5], size=(n, 2)).astype(np.int64))
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any)))
    category_of = np.array([-1, 0, 0, 1, 1, 2, -1, -1, -1, 2], dtype=np.int64)
    sent, _ = LabelPreparation(category_of, 3, semantics, keep_layers=False)(layers, levels)
    assert sent.layers is None and sent.sets is not None
    expected, expected_truth = prepare_labels(layers[keep], levels[keep], torch.from_numpy(category_of), 3, semantics)
    rows, truth = sent.rows(keep)
    assert torch.equal(truth, expected_truth) and torch.equal(rows.truth, expected.truth)
    assert torch.equal(rows.image_labels, expected.image_labels)
    assert torch.equal(rows.has_category, expected.has_category)
    sets, want = rows.label_sets(len(category_of)), expected.label_sets(len(category_of))
    assert sets.ids.dtype == want.ids.dtype and torch.equal(sets.ids, want.ids)
    assert torch.equal(sets.labels, want.labels) and torch.equal(sets.image, want.image)


def test_the_counting_leaves_the_loaders_workers_their_cores_for_a_while() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        with threads_beside(2, "cpu"):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
        with threads_beside(9, "cpu"):
            assert torch.get_num_threads() == 1  # one at least
        with pytest.raises(KeyError), threads_beside(1, "cpu"):
            assert torch.get_num_threads() == 3
            raise KeyError("the pass failed")
        assert torch.get_num_threads() == 4
        # Without workers, and for a GPU's pass, nothing changes.
        for workers, device in ((0, "cpu"), (2, "cuda:0")):
            with threads_beside(workers, device):
                assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
