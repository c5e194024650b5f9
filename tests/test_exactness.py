"""The fast path against the plain numpy protocol, number for number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netdissection
from netdissection.core.iou import IoUAccumulator, prepare_labels
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.reports.writers import tally_header

from . import bruteforce
from .random_broden import write_random_broden

IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
LITE = (np.array([124.6901, 118.6897, 109.5388]) / 255, np.array([0.224, 0.224, 0.224]))


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, stride=2, padding=1)).eval()


class Recorder:
    """Records, through its own forward hooks, the model inputs and the layer outputs of a run, so the
    brute force counts on the very activations the model produced (float32 convolutions may differ
    in their last bits between memory layouts), and the preprocessing is checked on its own."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[np.ndarray] = []
        self.outputs: dict[str, list[np.ndarray]] = {"1": [], "2": []}
        self.active = False
        model.register_forward_pre_hook(self._input)
        for name in self.outputs:
            model[int(name)].register_forward_hook(lambda _m, _i, out, n=name: self._keep(self.outputs[n], out))

    def _input(self, _m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.active = args[0].shape[-1] != 224  # skip the backend's shape probe at 224×224
        self._keep(self.inputs, args[0])

    def _keep(self, into: list[np.ndarray], tensor: torch.Tensor) -> None:
        if self.active:
            into.extend(tensor.detach().numpy().copy())


@pytest.fixture(scope="module")
def broden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_broden(tmp_path_factory.mktemp("data") / "broden", images=20, image_size=16,
                               label_size=8, seed=1)


@pytest.mark.parametrize("compat", ["paper", "lite"])
@pytest.mark.parametrize("q", [0.005, 0.15])
def test_counts_match_brute_force(broden: Path, tmp_path: Path, compat: str, q: float) -> None:
    model = tiny_model()
    recorder = Recorder(model)
    result = netdissection.dissect(model, dataset=str(broden), layers=["1", "2"], quantile=q, compat=compat,
                                   out=tmp_path / "out", batch_size=6, workers=0)
    data = bruteforce.read_broden(broden)
    mean, std = LITE if compat == "lite" else IMAGENET
    for seen, image in zip(recorder.inputs, data.images, strict=True):  # RGB/255, normalised
        np.testing.assert_allclose(seen, ((image / 255 - mean) / std).transpose(2, 0, 1), atol=1e-5)
    acts = recorder.outputs
    for layer in ("1", "2"):
        expected = bruteforce.dissect(acts[layer], data, q=q, lite=compat == "lite")
        got = result.layers[layer]
        np.testing.assert_array_equal(got.thresholds, expected.thresholds)
        units = got.units
        for label in data.pcat:
            assert got.truth[label] == expected.truth.get(label, 0), (layer, label)
            for u in range(units):
                assert got.intersection[u, label] == expected.intersection.get((u, label), 0), (layer, u, label)
        cats = got.vocabulary.categories
        for u in range(units):
            for c, name in enumerate(cats):
                assert got.activation[u, c] == expected.activation.get((u, name), 0), (layer, u, name)
        # Every count is checked; the masks are not trivial (some units fire on labelled pixels).
        assert got.intersection.sum() > 0

        # tally.csv: IoU per category to 1e-6, labels as the brute force picks them.
        tally = (tmp_path / "out" / layer / "tally.csv").read_text().splitlines()
        assert tally[0].split(",") == tally_header(cats)
        rows = {int(line.split(",")[0]): line.split(",") for line in tally[1:]}
        assert sorted(rows) == list(range(1, units + 1))
        for u in range(units):
            row = rows[u + 1]
            best = max(sorted(data.pcat), key=lambda lab: (expected.iou[(u, lab)], -lab))
            assert float(row[3]) == pytest.approx(expected.iou[(u, best)], abs=1e-6)
            if expected.iou[(u, best)] > 0:
                assert row[2] == data.names[best]
                assert row[1] == data.pcat[best]
            for c, name in enumerate(cats):
                members = [lab for lab in sorted(data.pcat) if data.pcat[lab] == name]
                top = max(members, key=lambda lab: (expected.iou[(u, lab)], -lab))
                assert float(row[4 + 5 * c + 4]) == pytest.approx(expected.iou[(u, top)], abs=1e-6)


def test_category_bookkeeping_matches_brute_force(broden: Path) -> None:
    """Primary categories and which images have which category (Lite's version silently broke)."""
    data = bruteforce.read_broden(broden)
    dataset = BrodenDataset(broden)
    pcat = {c.number: c.category for c in dataset.vocabulary.concepts}
    assert pcat == data.pcat
    # 'wheel' occurs as object and part, and its part coverage is larger: primary category part.
    assert pcat[5] == "part"
    category_of = torch.from_numpy(dataset.vocabulary.primary_category_index())
    expected = bruteforce.categories_present(data)
    assert any(len(e) < 3 for e in expected) and any(len(e) >= 4 for e in expected)
    for semantics in ("paper", "lite"):
        for i in range(len(dataset)):
            s = dataset.load(i, image=False)
            layers = torch.from_numpy(s.layers.astype(np.int64))[None]
            levels = torch.tensor([list(s.image_labels)], dtype=torch.int64).reshape(1, -1)
            batch, _ = prepare_labels(layers, levels, category_of, len(dataset.vocabulary.categories), semantics)
            has = {dataset.vocabulary.categories[c] for c in torch.nonzero(batch.has_category[0]).flatten()}
            assert has == expected[i], i


def test_selected_categories_change_primary_categories(broden: Path) -> None:
    dataset = BrodenDataset(broden, categories=["object", "color"])
    pcat = {c.number: c.category for c in dataset.vocabulary.concepts}
    data = bruteforce.read_broden(broden, categories=["object", "color"])
    assert pcat == data.pcat
    assert pcat[5] == "object"  # without the part category, wheel is an object
    assert 8 not in pcat  # hub is only a part


def _toy(semantics: str) -> tuple[np.ndarray, list[str]]:
    """DESIGN's paper-vs-Lite case: two 4×4 images, car top-left in 1 and bottom-right in 2."""
    car, red = 1, 2
    category_of = torch.tensor([-1, 0, 1])  # label 1 car: object (0); label 2 red: color (1)
    layers = torch.zeros(2, 2, 4, 4, dtype=torch.int64)
    layers[0, 0, :2, :2] = car
    layers[1, 0, 2:, 2:] = car
    layers[:, 1] = red
    acts = torch.zeros(2, 1, 4, 4)
    acts[0, 0, :2, :2] = 1
    acts[0, 0, 2:, 2:] = 1
    acts[1, 0, :2, :2] = 1
    batch, truth = prepare_labels(layers, torch.zeros(2, 0, dtype=torch.int64), category_of, 2, semantics)
    acc = IoUAccumulator(torch.tensor([0.5], dtype=torch.float64), category_of, 2, semantics)
    acc.add(acts, batch)
    inter, act = acc.counts()
    iou = [inter[0, lab].item() / (act[0, cat].item() + truth[lab].item() - inter[0, lab].item())
           for lab, cat in ((car, 0), (red, 1))]
    return np.array(iou), ["car", "red"]


def test_paper_versus_lite_toy_case() -> None:
    paper, _ = _toy("paper")
    lite, _ = _toy("lite")
    assert paper[0] == pytest.approx(0.250)
    assert lite[0] == pytest.approx(1 / 3)
    assert paper[1] == pytest.approx(0.375)
    assert lite[1] == pytest.approx(0.375)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_preprocessing_in_either_memory_layout(order: str) -> None:
    """The batch a backend gets: the same values whichever layout it asks for (a channels-last one comes
    without a copy), equal to the normalisation written out in NumPy."""
    from netdissection.core.scheduler import preprocess
    from netdissection.core.types import InputSpec

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8))
    spec = InputSpec(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), channel_order=order)
    plain = preprocess(images, spec, "cpu")
    last = preprocess(images, InputSpec(**{**spec.__dict__, "memory_format": "channels_last"}), "cpu")
    assert plain.shape == last.shape == (3, 3, 5, 7)
    assert plain.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)
    x = images.numpy().astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    expected = (x - np.float32([0.4, 0.5, 0.6])[:, None, None]) / np.float32([0.2, 0.25, 0.3])[:, None, None]
    if order == "BGR":
        expected = expected[:, ::-1]
    np.testing.assert_array_equal(plain.numpy(), expected)
