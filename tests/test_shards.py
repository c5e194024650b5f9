"""The passes over shards of the dataset, merged, against the one-process run: byte for byte.

Also where the later reads get their maps (disk cache or another forward pass), layer transforms,
and the partials travelling between processes (pickled).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import netdissection
from netdissection.core.cache import ActivationCache, choose_cache, parse_size
from netdissection.core.errors import DissectionError
from netdissection.core.partials import (
    ActivationPartial,
    layer_results,
    merge_all,
    settle_thresholds,
    split_shards,
)
from netdissection.core.scheduler import (
    CPU_FORWARD_CHUNK,
    LITE_INPUT,
    Plan,
    ShardRunner,
    first_pass_batches,
    forward_chunk,
    run_passes,
)
from netdissection.core.types import BackendOptions, InputSpec, LayerResult
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.reports.writers import tally_text, thresholds_text
from netdissection.plugins.thresholds.quantile import QuantileRule

from . import bruteforce
from .cli_checks import assert_one_line_error
from .random_broden import write_random_broden
from .test_exactness import Recorder, tiny_model

BATCH = 4


class Shifted(nn.Module):
    """Space to depth, then shifted down, so that the ReLU after it keeps only the brightest pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_unshuffle(x, 2) - 1.5


class Squashed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(torch.tanh(x * 3), 2)


def elementwise_model() -> nn.Module:
    """Maps computed per image and per position (no convolution), so an image's maps are the same bits
    whatever batch it is in: shards may then be any subsets. In layer "1" (mostly zero after the ReLU)
    images of random pixels mostly peak at the same value, so the order of dataset indices decides."""
    return nn.Sequential(Shifted(), nn.ReLU(), Squashed()).eval()


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_broden(tmp_path_factory.mktemp("data") / "broden", images=20, image_size=16,
                               label_size=8, seed=1)


def plan_for(model: nn.Module, broden: Path, compat: str, *, radix_layer: str | None = "1", room: int | None = None,
             q: float = 0.15, **options: Any) -> tuple[Plan, InputSpec]:
    """A plan as ``dissect`` builds it; the rule of ``radix_layer`` is forced into the multi-read selection, the
    other's top-k given ``room``."""
    backend = TorchvisionBackend(model, BackendOptions())
    dataset = BrodenDataset(broden)
    spec = backend.input_spec()
    if compat == "lite":
        spec = InputSpec(size=spec.size, mean=LITE_INPUT.mean, std=LITE_INPUT.std)
    units_of_radix_layer = 6 if radix_layer == "1" else -1

    def make_rule(units: int, values: int) -> QuantileRule:
        cap = {"memory_cap": 0, "digits": (11, 11, 10)} if units == units_of_radix_layer else {"room": room}
        return QuantileRule(units, values, q=q, compat=compat, **cap)

    plan = Plan(backend=backend, dataset=dataset, layers=["1", "2"], make_rule=make_rule, semantics=compat,
                batch_size=BATCH, workers=0, top_k=5, **options)
    return plan, spec


def files_of(results: dict[str, LayerResult]) -> dict[str, str]:
    return {f"{name}/{kind}": text(layer) for name, layer in results.items()
            for kind, text in (("tally.csv", tally_text), ("thresholds.csv", thresholds_text))}


def assert_same_results(got: dict[str, LayerResult], expected: dict[str, LayerResult]) -> None:
    assert files_of(got) == files_of(expected)
    for name, layer in expected.items():
        other = got[name]
        for field in ("thresholds", "intersection", "truth", "activation"):
            a, b = getattr(other, field), getattr(layer, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, field)
        assert other.top_images is not None and layer.top_images is not None
        for field in ("indices", "scores", "maps"):
            np.testing.assert_array_equal(getattr(other.top_images, field), getattr(layer.top_images, field))


def sharded(plan: Plan, spec: InputSpec, shards: list[np.ndarray]) -> tuple[dict[str, LayerResult], int, int]:
    """Drive one runner per shard as an executor in other processes would: every partial and rule state
    crosses a pickle, shards merge in reverse order. Returns the results, images and reads."""
    runners = [ShardRunner(plan, spec, s) for s in shards]
    reads = 1
    try:
        parts = [pickle.loads(pickle.dumps(r.activation_pass())) for r in runners]
        activations: ActivationPartial = merge_all(reversed(parts))

        def read(states: dict[str, Any]) -> list[dict[str, Any]]:
            nonlocal reads
            reads += 1
            sent = pickle.loads(pickle.dumps(states))
            return [pickle.loads(pickle.dumps(r.threshold_round(sent))) for r in runners]

        thresholds = settle_thresholds(activations, read)
        counts = merge_all(pickle.loads(pickle.dumps(r.iou_pass(thresholds))) for r in runners)
    finally:
        for r in runners:
            r.close()
    return layer_results(activations, thresholds, counts, plan.dataset.vocabulary), counts.images, reads


@pytest.mark.parametrize("compat", ["paper", "lite"])
def test_shards_merge_to_the_unsharded_run(broden: Path, compat: str) -> None:
    plan, spec = plan_for(tiny_model(), broden, compat)
    expected, images, _ = run_passes(plan, spec)
    assert images == 20
    # The forced layer read the maps three times and still equals the one-read top-k, bit for bit.
    one_read, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, radix_layer=None))
    assert one_read["1"].thresholds.tobytes() == expected["1"].thresholds.tobytes()
    assert expected["1"].intersection.sum() > 0
    for count in (2, 3, 5, 7):  # 7 shards of 5 batches: two shards are empty
        shards = split_shards(20, count, BATCH)
        assert sorted(np.concatenate(shards).tolist()) == list(range(20))
        got, images, reads = sharded(plan, spec, shards)
        assert images == 20 and reads == 3
        assert_same_results(got, expected)
    # And the same through run_passes with shards.
    got, _, _ = run_passes(plan, spec, shards=split_shards(20, 3, BATCH))
    assert_same_results(got, expected)


@pytest.mark.parametrize("compat", ["paper", "lite"])
def test_labels_prepared_in_loader_workers_give_the_same_results(broden: Path, compat: str) -> None:
    """The IoU pass's labels prepared in the loader's worker processes (label sets crossing to this
    process with each batch) count what labels prepared here count: from the disk cache, from
    recomputed maps, and in shards."""
    expected, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, radix_layer=None))
    for cache in ("disk", "recompute"):
        plan, spec = plan_for(tiny_model(), broden, compat, radix_layer=None, cache=cache)
        plan.workers = 2
        got, _, _ = run_passes(plan, spec)
        assert_same_results(got, expected)
    got, _, _ = sharded(plan, spec, split_shards(20, 3, BATCH))
    assert_same_results(got, expected)


def test_any_subsets_merge_to_the_unsharded_run(broden: Path) -> None:
    """Shards of images in shuffled order; top images that tie on their peak keep the lower index."""
    plan, spec = plan_for(elementwise_model(), broden, "paper", radix_layer=None)
    plan.make_rule = lambda units, values: QuantileRule(units, values, q=0.15, memory_cap=0)
    expected, _, _ = run_passes(plan, spec)
    top = expected["1"].top_images
    assert top is not None and (top.scores[:, 1:] == top.scores[:, :-1]).mean() > 0.5  # ties: the index decides
    rng = np.random.default_rng(5)
    for count in (2, 3, 5):
        shards = np.array_split(rng.permutation(20), count)
        got, _, reads = sharded(plan, spec, shards)
        assert reads == 8
        assert_same_results(got, expected)


@pytest.mark.parametrize("compat", ["paper", "lite"])
def test_recomputed_maps_give_the_same_results(broden: Path, compat: str) -> None:
    disk, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, cache="disk"))
    recomputed, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, cache="recompute"))
    assert_same_results(recomputed, disk)


@pytest.mark.parametrize("compat", ["paper", "lite"])
def test_maps_left_out_of_the_cache_change_nothing(broden: Path, compat: str, caplog: pytest.LogCaptureFixture
                                                  ) -> None:
    """A small top-k room compacts the top-k every batch, so its bound rises and the cache leaves out the maps
    whose peak is below it (q = 0.02: few maps fire): the same results as recomputing every map, in one shard
    or three."""
    with caplog.at_level(logging.DEBUG, logger="netdissection"):
        disk, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, room=3, q=0.02, cache="disk"))
    written = [r.getMessage() for r in caplog.records if r.getMessage().startswith("activation cache of 2:")]
    kept, seen = (int(word) for word in written[0].split()[4:7:2])
    assert seen == 20 * 5 and 0 < kept < seen  # layer "2": 20 images × 5 units, some left out
    assert any(r.getMessage().startswith("activation cache of 1: 120 of 120 maps") for r in caplog.records)  # radix
    recomputed, _, _ = run_passes(*plan_for(tiny_model(), broden, compat, room=3, q=0.02, cache="recompute"))
    assert_same_results(disk, recomputed)
    shards, _, _ = sharded(*plan_for(tiny_model(), broden, compat, room=3, q=0.02, cache="disk"),
                           [np.arange(0, 20, 3), np.arange(1, 20, 3), np.arange(2, 20, 3)])
    assert_same_results(shards, recomputed)


def test_cache_budget_switches_to_recompute(broden: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    """Through dissect(): the disk cache, and a budget too small for it (one notice, same files)."""
    outputs = {}
    for name, options in (("disk", {"cache": "disk"}), ("budget", {"cache_budget": "1K"})):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="netdissection"):
            netdissection.dissect(tiny_model(), dataset=str(broden), layers=["1", "2"], out=tmp_path / name,
                                  batch_size=BATCH, workers=0, reporters=["tally", "thresholds"], **options)
        notices = [r.getMessage() for r in caplog.records if "recomputed" in r.getMessage()]
        outputs[name] = {p.relative_to(tmp_path / name): p.read_bytes()
                         for p in (tmp_path / name).glob("*/*.csv")}
        if name == "budget":
            # 20 images × ((6·8·8 + 5·4·4) floats × 4 bytes + a 4-byte mask of the units kept per layer) =
            # 37,280 bytes at most, over the 1 KB budget.
            assert notices == ["the activation cache would take 36.4 KB, over the --cache-budget of 1.0 KB: "
                               "the maps are recomputed (another forward pass) for the later reads"]
        else:
            assert notices == []
    assert len(outputs["disk"]) == 4 and outputs["budget"] == outputs["disk"]


def test_layer_transform_is_honoured_exactly(broden: Path) -> None:
    """A fixed permutation of the units plus one new unit (a difference of two): the rule, the counts
    and the top images see the transformed maps, checked against the brute force on them."""
    model = tiny_model()
    recorder = Recorder(model)
    perm = torch.tensor([3, 0, 4, 1, 2])

    def transform(acts: torch.Tensor) -> torch.Tensor:
        return torch.cat([acts[:, perm], acts[:, :1] - acts[:, 1:2]], dim=1)

    plan, spec = plan_for(model, broden, "paper", radix_layer=None, transforms={"2": transform})
    results, _, _ = run_passes(plan, spec)
    raw = np.stack(recorder.outputs["2"])
    maps = np.concatenate([raw[:, perm.numpy()], raw[:, :1] - raw[:, 1:2]], axis=1)
    expected = bruteforce.dissect(list(maps), bruteforce.read_broden(broden), q=0.15)
    got = results["2"]
    assert got.units == 6
    np.testing.assert_array_equal(got.thresholds, expected.thresholds)
    data = bruteforce.read_broden(broden)
    for u in range(6):
        for label in data.pcat:
            assert got.intersection[u, label] == expected.intersection.get((u, label), 0), (u, label)
        for c, name in enumerate(got.vocabulary.categories):
            assert got.activation[u, c] == expected.activation.get((u, name), 0), (u, name)
    assert got.top_images is not None
    peaks = maps.max(axis=(2, 3))  # (images, units)
    for u in range(6):
        best = sorted(range(len(maps)), key=lambda i: (-peaks[i, u], i))[:5]
        assert got.top_images.indices[u].tolist() == best
        np.testing.assert_array_equal(got.top_images.maps[u], maps[best, u])


def test_split_shards_keeps_whole_batches() -> None:
    shards = split_shards(20, 3, 4)
    assert [s.tolist() for s in shards] == [list(range(0, 4)), list(range(4, 12)), list(range(12, 20))]
    assert [len(s) for s in split_shards(5, 4, 4)] == [0, 4, 0, 1]
    with pytest.raises(DissectionError, match="at least 1"):
        split_shards(5, 0, 4)


def test_shards_must_cover_the_dataset(broden: Path) -> None:
    plan, spec = plan_for(tiny_model(), broden, "paper")
    with pytest.raises(DissectionError, match="cover each"):
        run_passes(plan, spec, shards=[np.arange(10)])
    with pytest.raises(DissectionError, match="same image twice"):
        ShardRunner(plan, spec, [1, 1])


@pytest.mark.parametrize("units", [1, 5, 32, 33])
def test_the_cache_gives_back_each_kept_map_and_minus_inf_for_the_rest(tmp_path: Path, units: int) -> None:
    """Batches at positions out of order, each with its own units kept (none, some, all); read back in any
    order and grouping: the kept maps bit for bit, the others -inf."""
    rng = np.random.default_rng(units)
    images, shape = 12, (units, 3, 2)
    maps = rng.normal(size=(images, *shape)).astype(np.float32)
    maps[0, 0] = -0.0
    kept = rng.random((images, units)) < 0.5
    kept[1], kept[2] = False, True
    cache = ActivationCache(tmp_path / "layer.f32", images)
    try:
        for batch in (np.array([3, 4, 5]), np.array([0, 1, 2]), np.array([9, 6]), np.array([7, 8, 10, 11])):
            cache.write(batch, torch.from_numpy(maps[batch]), torch.from_numpy(kept[batch]))
        expected = np.where(kept[:, :, None, None], maps, -np.inf).astype(np.float32)
        for positions in (np.arange(images), np.array([2, 3, 4, 5, 0]), np.array([11, 1, 6, 9, 7])):
            got = cache.read(positions).numpy()
            np.testing.assert_array_equal(got.view(np.uint32), expected[positions].view(np.uint32))
        assert cache.maps_written == kept.sum() and cache.maps_seen == images * units
        assert cache.size == images * 4 * -(-units // 32) + kept.sum() * 4 * 6
    finally:
        cache.close()
    assert not (tmp_path / "layer.f32").exists()


def test_cache_sizes_and_choice(tmp_path: Path) -> None:
    assert parse_size("500M") == 500 * 2**20
    assert parse_size("20G") == 20 * 2**30
    assert parse_size("1.5gib") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096 and parse_size(None) is None
    with pytest.raises(DissectionError, match="a size like 500M"):
        parse_size("lots")
    assert choose_cache("auto", 10, tmp_path, None)[0]
    assert not choose_cache("auto", 10, tmp_path, 9)[0]
    assert not choose_cache("auto", 2**62, tmp_path, None)[0]  # more than the free space
    assert choose_cache("disk", 10, tmp_path, 1)[0]  # --cache disk: whatever the budget ...
    with pytest.raises(DissectionError, match=r"--cache disk: the activation cache would take 4096\.0 TB.*free"):
        choose_cache("disk", 2**52, tmp_path, None)  # ... but not past the free space
    assert not choose_cache("recompute", 1, tmp_path, None)[0]


def test_cli_refuses_a_bad_budget(run_cli: Any) -> None:
    code, _out, err = run_cli("resnet18", "--cache-budget", "lots")
    assert_one_line_error(code, err, "--cache-budget must be a size like 500M or 20G, not 'lots'")


def test_cli_cache_budget_notice_and_same_tally(run_cli: Any, tmp_path: Path) -> None:
    from netdissection.plugins.datasets.generated import generate_concept_set

    data = generate_concept_set(tmp_path / "gen", images=8, image_size=64, seed=0)
    tallies = {}
    for name, options in (("disk", ["--cache", "disk"]), ("budget", ["--cache-budget", "100K"])):
        code, _out, err = run_cli("resnet18", "--dataset", data, "--layer", "layer4", "--out", tmp_path / name,
                                  "--workers", "0", "--report", "tally", *options)
        assert code == 0, err
        # 8 images × (512 units × 2×2 × 4 bytes + a 64-byte mask) = 64.5 KiB: within 100K, so the disk cache.
        assert "recomputed" not in err
        tallies[name] = (tmp_path / name / "layer4" / "tally.csv").read_bytes()
    code, _out, err = run_cli("resnet18", "--dataset", data, "--layer", "layer3", "--layer", "layer4", "--out",
                              tmp_path / "small", "--workers", "0", "--report", "tally", "--cache-budget", "100K")
    assert code == 0, err
    # layer3 adds 8 × 256 × 4×4 × 4 bytes, and each image's masks of the units kept 8 × (64 + 32) bytes:
    # 192.8 KiB in all at most, over the budget.
    assert ("the activation cache would take 192.8 KB, over the --cache-budget of 100.0 KB: the maps are "
            "recomputed (another forward pass) for the later reads") in " ".join(err.split())
    assert (tmp_path / "small" / "layer4" / "tally.csv").read_bytes() == tallies["disk"] == tallies["budget"]


class PositiveCounts:
    """A per-layer accumulator as ``Plan.make_diagnostics`` makes: values above zero, per unit."""

    def __init__(self, units: int) -> None:
        self.counts = torch.zeros(units, dtype=torch.int64)

    def update(self, activations: torch.Tensor) -> None:
        self.counts += (activations > 0).sum(dim=(0, 2, 3))

    def merge(self, other: PositiveCounts) -> PositiveCounts:
        self.counts += other.counts
        return self


def test_layer_accumulators_see_every_map_and_merge(broden: Path) -> None:
    model = tiny_model()
    recorder = Recorder(model)
    plan, spec = plan_for(model, broden, "paper", radix_layer=None,
                          make_diagnostics=lambda layer, units: PositiveCounts(units))
    runners = [ShardRunner(plan, spec, s) for s in split_shards(20, 3, BATCH)]
    try:
        merged = merge_all(pickle.loads(pickle.dumps(r.activation_pass())) for r in runners)
    finally:
        for r in runners:
            r.close()
    for layer in ("1", "2"):
        maps = np.stack(recorder.outputs[layer])
        diagnostics = merged.layers[layer].diagnostics
        assert isinstance(diagnostics, PositiveCounts)
        assert diagnostics.counts.tolist() == (maps > 0).sum(axis=(0, 2, 3)).tolist()
        assert merged.layers[layer].values == maps.shape[0] * maps.shape[2] * maps.shape[3]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("chunked_by", ["scheduler", "backend"])
def test_the_model_runs_a_batch_in_chunks_with_the_same_results(broden: Path, chunk: int, chunked_by: str) -> None:
    """The model sees each batch ``forward_chunk`` images at a time (what a CPU run does to bound the model's
    own memory), split by the scheduler or by a backend that takes whole batches: the chunks' maps are the
    batch's maps, so the results are those of one forward pass per batch, byte for byte (a model whose maps do
    not depend on the batch), in every pass that runs the model."""
    whole, _, _ = run_passes(*plan_for(elementwise_model(), broden, "paper", forward_chunk=BATCH, cache="recompute"))
    model = elementwise_model()
    plan, spec = plan_for(model, broden, "paper", forward_chunk=chunk, cache="recompute")
    if chunked_by == "scheduler":
        plan.backend.take_whole_batches = lambda batch, chunk: False  # type: ignore[attr-defined]
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    given: list[int] = []
    activations = plan.backend.activations

    def counted(images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        given.append(len(images))
        return activations(images, layers)

    plan.backend.activations = counted  # type: ignore[method-assign]
    chunked, _, _ = run_passes(plan, spec)
    assert_same_results(chunked, whole)
    # Batches of 4 in chunks (3 and 1, or ones), in the activation pass, the IoU pass and any read between them.
    assert max(sizes) == chunk and sum(sizes) % 20 == 0 and sum(sizes) >= 2 * 20
    assert max(given) == (chunk if chunked_by == "scheduler" else BATCH)


def test_forward_chunks_by_device(broden: Path) -> None:
    plan, _ = plan_for(tiny_model(), broden, "paper")
    assert forward_chunk(plan) == CPU_FORWARD_CHUNK
    assert forward_chunk(dataclasses.replace(plan, device="cuda:0")) == plan.batch_size  # a GPU: the whole batch
    assert forward_chunk(dataclasses.replace(plan, forward_chunk=2)) == 2


class RowsPerImage(nn.Module):
    """A hostile model: the shape of its maps depends on how many images it runs at once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :len(x)]


def test_maps_that_depend_on_the_chunk_are_refused(broden: Path) -> None:
    model = nn.Sequential(RowsPerImage(), nn.ReLU(), nn.Identity()).eval()
    plan, spec = plan_for(model, broden, "paper", forward_chunk=3)
    with pytest.raises(DissectionError) as caught:
        run_passes(plan, spec)
    assert str(caught.value) == ("layer '1': its maps have shape (16, 3, 3) for 3 images run at once and (16, 3, 1) "
                                 "for 1; the model's maps must not depend on how many images it runs at once")


def test_started_batches_serve_a_whole_run_and_only_that(broden: Path) -> None:
    """The activation pass's batches started before the model was built (``Plan.started``) are read by a run
    over the whole dataset; a run in shards reads its own, and the started ones stop. The results are the
    same either way."""
    expected, _, _ = run_passes(*plan_for(tiny_model(), broden, "paper", radix_layer=None))
    for shards in (None, split_shards(20, 3, BATCH)):
        plan, spec = plan_for(tiny_model(), broden, "paper", radix_layer=None)
        plan.workers = 1
        started = plan.started = first_pass_batches(plan.dataset, batch_size=plan.batch_size, workers=1,
                                                    skip_bad=False, device="cpu")
        got, _, _ = run_passes(plan, spec, shards=shards)
        assert_same_results(got, expected)
        assert plan.started is None and started.gi_frame is None  # taken and read to the end, or closed
