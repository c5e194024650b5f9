"""The quantile rule against ``numpy.quantile`` on the concatenated values, bit for bit.

Both ways the rule computes (a running top-k when it is small, a radix selection bounded whatever the
number of values), fed in any batching and split into shards merged by the documented protocol.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from netdissection.core.protocols import MergeableThresholdRule, MultiRoundThresholdRule
from netdissection.core.quantile import StreamingTopK
from netdissection.plugins.thresholds.quantile import DEFAULT_MEMORY_CAP, QuantileRule

LITE_LEVEL = {q: (int(1000 * (1 - q)) - 1) / 999 for q in (0.005, 0.15, 0.5, 0.999)}


def numpy_thresholds(acts: np.ndarray, q: float, compat: str) -> np.ndarray:
    """The protocol's definition: numpy.quantile over every value of each unit (as float64)."""
    values = acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1).astype(np.float64)
    if compat == "lite":
        out = np.array([np.quantile(v, (int(1000 * (1 - q)) - 1) / 999, method="hazen") for v in values])
    else:
        out = np.array([np.quantile(v, 1 - q) for v in values])
    return out + 0.0  # one zero: −0.0 and 0.0 are the same threshold (masks use a strict >)


def run_rule(acts: np.ndarray, q: float, compat: str, *, cap: int | None = None,
             digits: tuple[int, ...] | None = None, shards: int = 1, seed: int = 0) -> tuple[np.ndarray, int]:
    """Feed ``acts`` to the rule as the scheduler does: images in random order and batches, split into
    shards that each hold their own rule state, merged after every read; another read while the rule
    asks for one. Returns the thresholds and the number of reads."""
    rng = np.random.default_rng(seed)
    n, units, h, w = acts.shape
    options: dict[str, object] = {} if cap is None else {"memory_cap": cap}
    if digits is not None:
        options["digits"] = digits
    parts = np.array_split(rng.permutation(n), shards)

    def read(rule: QuantileRule, images: np.ndarray) -> QuantileRule:
        rule = copy.deepcopy(rule)  # each shard works on its own copy of the state it is handed
        for batch in np.array_split(images, max(1, len(images) // 3)):
            if len(batch):
                rule.update(torch.from_numpy(acts[np.sort(batch)]))
        return rule

    def merged(states: list[QuantileRule]) -> QuantileRule:
        first = states[0]
        for other in states[1:]:
            first = first.merge(other)
        return first

    fresh = QuantileRule(units, n * h * w, q=q, compat=compat, **options)
    rule = merged([read(fresh, part) for part in parts])
    reads = 1
    while (following := rule.next_round()) is not None:
        rule = merged([read(following, part) for part in parts])
        reads += 1
    return rule.finish(), reads


def assert_bit_equal(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got.view(np.uint64), expected.view(np.uint64))


def hard_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    relu = np.maximum(rng.normal(size=(9, 4, 5, 6)), 0).astype(np.float32)  # mostly repeated zeros
    zeros = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    zeros[zeros < 0.5] = -0.0  # both zeros, of both signs, side by side
    zeros[::2, :, ::2] = 0.0
    spread = (rng.normal(size=(5, 3, 4, 4)) * 10.0 ** rng.integers(-40, 38, size=(5, 3, 4, 4))).astype(np.float32)
    return {
        "ties": rng.integers(-3, 4, size=(8, 5, 3, 3)).astype(np.float32),
        "relu zeros": relu,
        "negative": (rng.normal(size=(7, 3, 4, 5)) - 5).astype(np.float32),
        "signed zeros": zeros,
        "constant unit": np.concatenate([np.full((6, 1, 3, 3), 3.5, np.float32),
                                         rng.normal(size=(6, 2, 3, 3)).astype(np.float32)], axis=1),
        "denormals and huge": spread,
        "one value": np.array([[[[-2.25]]]], dtype=np.float32),
        "two values": np.array([[[[1.0]], [[5.0]]], [[[3.0]], [[5.0]]]], dtype=np.float32),
    }


@pytest.mark.parametrize("compat", ["paper", "lite"])
@pytest.mark.parametrize("q", [0.005, 0.15, 0.5, 0.999])
@pytest.mark.parametrize("case", list(hard_cases()))
def test_bit_equal_to_numpy_quantile(case: str, q: float, compat: str) -> None:
    acts = hard_cases()[case]
    expected = numpy_thresholds(acts, q, compat)
    top, reads = run_rule(acts, q, compat)
    assert_bit_equal(top, expected)
    assert reads == 1  # small: the running top-k answers in the activation pass
    # Forced into the radix selection (a cap of 0): the narrowest digits the cap leaves, and wider ones.
    for digits, expected_reads in ((None, 8), ((11, 11, 10), 3), ((16, 16), 2)):
        for shards in (1, 3):
            got, reads = run_rule(acts, q, compat, cap=0, digits=digits, shards=shards, seed=shards)
            assert_bit_equal(got, expected)
            assert reads == expected_reads


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf − inf in numpy's lerp, and ours
@settings(max_examples=60, deadline=None)
@given(acts=hnp.arrays(np.float32, hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4),
                       elements=st.floats(width=32, allow_nan=False, allow_infinity=True)),
       q=st.sampled_from([0.005, 0.1, 0.5, 0.95]), compat=st.sampled_from(["paper", "lite"]),
       cap=st.sampled_from([None, 0, 2048]), shards=st.integers(1, 3))
def test_property_bit_equal(acts: np.ndarray, q: float, compat: str, cap: int | None, shards: int) -> None:
    expected = numpy_thresholds(acts, q, compat)
    got, _ = run_rule(acts, q, compat, cap=cap, shards=min(shards, acts.shape[0]))
    # Infinities of both signs make numpy's lerp NaN (inf − inf): compare NaN to NaN too.
    np.testing.assert_array_equal(got, expected)
    finite = ~np.isnan(expected)
    assert_bit_equal(got[finite], expected[finite])


def test_buffers_do_not_grow_with_the_number_of_values() -> None:
    """resnet18 conv1 (64 units, 112×112 maps): a running top-k holds q·n values per unit (32 MB at
    2,000 images, 321 MB at 20,000, 1 GB on all of Broden); past the cap the rule's buffers stay the
    same size whatever the number of images."""
    per_image = 112 * 112
    sizes = {}
    for images in (2_000, 20_000, 63_305):
        rule = QuantileRule(64, images * per_image)
        rule.update(torch.randn(2, 64, 112, 112))
        sizes[images] = (rule.mode, rule.buffer_bytes)
    # The top-k buffer: k values per unit within the cap, and room to insert more (an eighth of k, or 4 MB).
    assert sizes[2_000][0] == "top-k" and sizes[2_000][1] <= 1.125 * DEFAULT_MEMORY_CAP + 2**22
    assert sizes[20_000] == sizes[63_305] == ("radix", sizes[20_000][1])
    assert sizes[20_000][1] <= 1.01 * DEFAULT_MEMORY_CAP
    # Small layers keep the top-k, which answers without another read.
    layer4 = QuantileRule(512, 2_000 * 7 * 7)
    assert layer4.mode == "top-k" and layer4.buffer_bytes <= DEFAULT_MEMORY_CAP
    assert layer4.next_round() is None


@pytest.mark.parametrize(("units", "cap", "digits"), [
    (64, DEFAULT_MEMORY_CAP, (16, 16)),  # 64 units × 65,536 bins × 8 bytes = 32 MiB: two reads
    (256, DEFAULT_MEMORY_CAP, (11, 11, 10)),
    (2048, DEFAULT_MEMORY_CAP, (11, 11, 10)),
    (2048, 2**20, (6, 6, 5, 5, 5, 5)),
    (5, 0, (4,) * 8),
])
def test_digits_fit_the_memory_cap(units: int, cap: int, digits: tuple[int, ...]) -> None:
    rule = QuantileRule(units, 10**12, memory_cap=cap)
    assert rule.mode == "radix" and rule.digits == digits
    counts = units * 2 ** max(digits) * 8
    assert counts <= max(cap, units * 2**4 * 8) and rule.buffer_bytes < counts + units * 64


def test_rule_says_what_it_can_do() -> None:
    rule = QuantileRule(3, 100)
    assert isinstance(rule, MergeableThresholdRule) and isinstance(rule, MultiRoundThresholdRule)


def test_finish_before_the_last_read_is_an_error() -> None:
    rule = QuantileRule(2, 64, memory_cap=0)
    rule.update(torch.randn(4, 2, 4, 4))
    with pytest.raises(RuntimeError, match="another read"):
        rule.finish()


def test_merge_refuses_states_of_different_rules() -> None:
    a, b = QuantileRule(2, 64), QuantileRule(2, 64, q=0.1)
    with pytest.raises(ValueError, match="same"):
        a.merge(b)


@settings(max_examples=150, deadline=None)
@given(acts=hnp.arrays(np.float32, st.tuples(*(st.integers(1, side) for side in (12, 3, 3, 4))),
                       elements=st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=True),
                                          st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5]))),
       k=st.integers(1, 40), room=st.integers(1, 9), shards=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_streaming_top_k_keeps_the_k_largest(acts: np.ndarray, k: int, room: int, shards: int, seed: int) -> None:
    """Whatever the batches, shards, ties and insertion room (small rooms force many compactions), the
    running top-k holds exactly the k largest values of each unit (all of them when there are fewer)."""
    rng = np.random.default_rng(seed)
    n, units = acts.shape[:2]
    states = []
    for part in np.array_split(rng.permutation(n), min(shards, n)):
        top = StreamingTopK(units, k, room=room)
        cuts = np.sort(rng.choice(np.arange(1, len(part)), size=min(2, len(part) - 1), replace=False))
        for batch in np.split(part, cuts):
            top.update(torch.from_numpy(acts[batch]))
        states.append(top)
    merged = states[0]
    for other in states[1:]:
        merged = merged.merge(other)
    values = np.sort(acts.transpose(1, 0, 2, 3).reshape(units, -1), axis=1) + 0.0
    expected = values[:, -k:]
    assert merged.count == values.shape[1]
    np.testing.assert_array_equal(np.sort(merged.kept().numpy(), axis=1) + 0.0, expected)
    assert merged.buffer_bytes == 4 * units * (k + room)
