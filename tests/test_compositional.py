"""Compositional explanations (``--explain compositional``): exact IoUs of formulas against a plain numpy brute
force, the beam search against an exhaustive search, planted units explained by their formulas, the files,
the job key, shards, and the one-line errors."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import netdissection
from netdissection.core.explain import ExplainerChoice, read_explanations, run_explainer
from netdissection.core.jobkey import Job, key_material, key_of
from netdissection.core.partials import split_shards
from netdissection.core.scheduler import Plan, run_passes
from netdissection.core.types import Explanation, LayerResult, Vocabulary
from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.plugins.explainers import compositional
from netdissection.plugins.explainers.counts import FormulaCounts
from netdissection.plugins.explainers.formulas import (
    AND,
    AND_NOT,
    OR,
    Formula,
    Leaf,
    Node,
    canonical,
    leaves,
    parse,
    text,
)
from netdissection.plugins.thresholds.quantile import QuantileRule

from . import bruteforce
from .cli_checks import assert_one_line_error
from .random_broden import write_random_broden

Q = 0.15
IMAGES = 20


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, stride=2, padding=1)).eval()


# ---- the brute force: every mask written out in numpy ------------------------------------------------------


@dataclass
class Brute:
    """Unit masks ``(U, X, sh, sw)`` per layer, concept masks ``(X, sh, sw)``, each image's categories."""

    units: dict[str, np.ndarray]
    concepts: dict[int, np.ndarray]
    has: list[set[str]]
    pcat: dict[int, str]
    tally_iou: dict[str, dict[tuple[int, int], float]]

    def mask(self, formula: Formula) -> np.ndarray:
        if isinstance(formula, Leaf):
            return self.concepts[formula.label]
        left, right = self.mask(formula.left), self.mask(formula.right)
        return {AND: left & right, OR: left | right, AND_NOT: left & ~right}[formula.op]

    def iou(self, layer: str, unit: int, formula: Formula) -> float:
        """|M ∩ F| / (|M| over the images having a category of F's concepts + |F| − |M ∩ F|)."""
        m, f = self.units[layer][unit], self.mask(formula)
        categories = {self.pcat[label] for label in leaves(formula)}
        domain = np.array([bool(h & categories) for h in self.has])
        inter = int((m & f).sum())
        denominator = int(m[domain].sum()) + int(f.sum()) - inter
        return inter / denominator if denominator > 0 else 0.0


def brute_force(root: Path, activations: Mapping[str, list[np.ndarray]]) -> Brute:
    data = bruteforce.read_broden(root)
    units, tally = {}, {}
    for layer, acts in activations.items():
        expected = bruteforce.dissect(acts, data, q=Q)
        units[layer] = np.stack([np.stack([bruteforce.bilinear(maps[u].astype(np.float64), *data.label_shapes[x])
                                           > expected.thresholds[u] for x, maps in enumerate(acts)])
                                 for u in range(acts[0].shape[0])])
        tally[layer] = expected.iou
    concepts = {}
    for label in data.pcat:
        masks = []
        for x, shape in enumerate(data.label_shapes):
            mask = np.zeros(shape, dtype=bool)
            for layer in data.layers[x]:
                mask |= layer == label
            if label in data.image_labels[x]:
                mask[:] = True
            masks.append(mask)
        concepts[label] = np.stack(masks)
    return Brute(units, concepts, bruteforce.categories_present(data), data.pcat, tally)


def formulas_up_to_two(labels: Sequence[int]) -> list[Formula]:
    single: list[Formula] = [Leaf(label) for label in labels]
    pairs: list[Formula] = [Node(op, Leaf(a), Leaf(b)) for a, b in itertools.permutations(labels, 2)
                            for op in (AND, OR, AND_NOT)]
    return single + pairs


# ---- a third-party explainer: the exact IoU of every formula of length 2, from one read ----------------------


class EveryPair:
    """Scores every ``l1 op l2`` for every unit with one read and the search's own step, and keeps them all."""

    def __init__(self) -> None:
        self.scores: dict[str, dict[int, dict[tuple[object, ...], tuple[Formula, float]]]] = {}

    def explain(self, layers: Mapping[str, LayerResult], read: Any,
                units: Sequence[int] | None) -> dict[str, list[Explanation]]:
        everything = 10**6
        beams = {name: compositional.first_beams(result, range(result.units), everything)
                 for name, result in layers.items()}
        request, places = compositional.request_for(beams)
        partial = read(functools.partial(FormulaCounts, request))
        rows: dict[str, list[Explanation]] = {}
        for name, result in layers.items():
            slots: dict[int, dict[int, int]] = {}
            for s, (u, b) in enumerate(places[name]):
                slots.setdefault(u, {})[b] = s
            self.scores[name] = {}
            rows[name] = []
            for u, entries in beams[name].items():
                found = compositional.expand(result, u, entries, slots[u], partial.layers[name],
                                             request.slots[name][1], partial, everything)
                self.scores[name][u] = {e.key: (e.formula, e.iou) for e in found}
                best = found[0]
                rows[name].append(Explanation(u + 1, text(best.formula, result.vocabulary.names()), best.iou,
                                              len(leaves(best.formula)), "", 0.0))
        return rows


class EveryPairPlugin:
    __name__ = "every_pair_plugin"

    def __init__(self) -> None:
        self.explainer = EveryPair()

    @netdissection.hookimpl
    def dissect_register_explainers(self, register) -> None:  # type: ignore[no-untyped-def]
        register("every-pair", lambda: self.explainer, description="every formula of length 2, for the tests")


# ---- fixtures ----------------------------------------------------------------------------------------------


class Recorder:
    """The maps of layers "1" and "2" of the first full read (the activation pass), from the model's own hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, list[np.ndarray]] = {"1": [], "2": []}
        for name in self.outputs:
            model[int(name)].register_forward_hook(lambda _m, args, out, n=name: self._keep(n, args[0], out))

    def _keep(self, name: str, given: torch.Tensor, out: torch.Tensor) -> None:
        if given.shape[-1] != 112 and len(self.outputs[name]) < IMAGES:  # not the backend's probe at 224 px
            self.outputs[name].extend(out.detach().numpy().copy())


@dataclass
class Setup:
    root: Path
    model: nn.Module
    brute: Brute
    vocabulary: Vocabulary


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = write_random_broden(tmp_path_factory.mktemp("data") / "broden", images=IMAGES, image_size=16,
                               label_size=8, seed=1)
    model = tiny_model()
    recorder = Recorder(model)
    result = netdissection.dissect(model, dataset=str(root), layers=["1", "2"], quantile=Q, batch_size=6, workers=0)
    assert all(len(v) == IMAGES for v in recorder.outputs.values())
    return Setup(root, model, brute_force(root, recorder.outputs), result.layers["1"].vocabulary)


def run(setup: Setup, out: Path | None = None, **options: Any) -> netdissection.RunResult:
    return netdissection.dissect(setup.model, dataset=str(setup.root), layers=["1", "2"], quantile=Q, batch_size=6,
                                 workers=0, out=out, **options)


# ---- exactness ---------------------------------------------------------------------------------------------


def test_every_formula_of_length_two_scores_as_the_brute_force(setup: Setup) -> None:
    """The counts of one read and the algebra (AND, OR, AND NOT from |M∩F∩l|, |F∩l|, I, G) give the exact IoU of
    every ``l1 op l2`` for every unit — checked formula by formula against masks built in numpy."""
    plugin = EveryPairPlugin()
    host = netdissection.build_host(entry_points=False, extra_plugins=(plugin,))
    result = run(setup, explain="every-pair", host=host)
    assert result.provenance["explainer"]["name"] == "every-pair"
    labels = sorted(setup.brute.pcat)
    checked = nonzero = 0
    for layer, per_unit in plugin.explainer.scores.items():
        for u, scores in per_unit.items():
            for formula in formulas_up_to_two(labels):
                key = canonical(formula)
                assert key in scores, (layer, u, formula)
                expected = setup.brute.iou(layer, u, formula)
                got_formula, got = scores[key]
                # a AND b is b AND a: whichever order the search kept has the same mask
                assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), (layer, u, formula, got_formula)
                checked += 1
                nonzero += expected > 0
    n = len(labels)
    assert checked == (6 + 5) * (n + n * (n - 1) * 3) and nonzero > checked // 4


def test_beam_search_finds_the_best_formula_of_length_two(setup: Setup) -> None:
    labels = sorted(setup.brute.pcat)
    result = run(setup, explain="compositional", explain_params={"formula_length": 2, "beam": len(labels)})
    for layer, layer_result in result.layers.items():
        rows = layer_result.explanations
        assert rows is not None and [r.unit for r in rows] == list(range(1, layer_result.units + 1))
        for row in rows:
            u = row.unit - 1
            best = max(setup.brute.iou(layer, u, f) for f in formulas_up_to_two(labels))
            assert row.iou == pytest.approx(best, rel=1e-12), (layer, row)
            # The formula it names has that IoU (its text parses back to the same formula).
            assert setup.brute.iou(layer, u, parse(row.formula, setup.vocabulary)) == pytest.approx(row.iou, rel=1e-12)
            assert row.length == len(leaves(parse(row.formula, setup.vocabulary)))
    assert any(r.length == 2 for layer in result.layers.values() for r in layer.explanations or ())


def test_length_three_and_a_given_formula_are_exact(setup: Setup) -> None:
    result = run(setup, explain="compositional", explain_params={"formula_length": 3, "beam": 3})
    lengths = set()
    for layer, layer_result in result.layers.items():
        for row in layer_result.explanations or ():
            formula = parse(row.formula, setup.vocabulary)
            assert setup.brute.iou(layer, row.unit - 1, formula) == pytest.approx(row.iou, rel=1e-12), (layer, row)
            assert row.iou >= row.label_iou
            lengths.add(row.length)
    assert 3 in lengths
    given = "(car OR tree) AND NOT red-c"
    scored = run(setup, explain="compositional", explain_params={"formula": given}, explain_units=[2, 4])
    formula = parse(given, setup.vocabulary)
    for layer, layer_result in scored.layers.items():
        rows = layer_result.explanations or []
        assert [r.unit for r in rows] == [2, 4]
        for row in rows:
            assert row.formula == given and row.length == 3
            assert row.iou == pytest.approx(setup.brute.iou(layer, row.unit - 1, formula), rel=1e-12)


def test_length_one_is_the_ordinary_label(setup: Setup, tmp_path: Path) -> None:
    result = run(setup, tmp_path / "out", explain="compositional", explain_params={"formula_length": 1})
    from netdissection.core.scores import unit_scores

    for name, layer in result.layers.items():
        tally = {r.unit: r for r in unit_scores(layer)}
        assert layer.explanations is not None and len(layer.explanations) == layer.units
        for row in layer.explanations:
            assert (row.formula, row.iou, row.length) == (tally[row.unit].label, tally[row.unit].score, 1)
            assert (row.label, row.label_iou) == (row.formula, row.iou)
            # ... and the tally's score is the brute force's
            label = parse(row.formula, setup.vocabulary)
            assert row.iou == pytest.approx(setup.brute.iou(name, row.unit - 1, label), rel=1e-12)


def test_shards_and_pickled_reads_give_the_same_explanations(setup: Setup) -> None:
    """The read's factory and partials pickle, and shards merge by addition: the explanations of a run over
    three shards equal those of one process."""
    dataset = BrodenDataset(setup.root)
    backend = TorchvisionBackend(setup.model, netdissection.BackendOptions())
    choice = ExplainerChoice("compositional", compositional.Compositional(formula_length=3, beam=4))

    def pickled(read: Any) -> Any:
        return lambda factory, stage="explain": pickle.loads(pickle.dumps(read(pickle.loads(pickle.dumps(factory)),
                                                                               stage)))

    plan = Plan(backend=backend, dataset=dataset, layers=["1", "2"], semantics="paper", batch_size=6, workers=0,
                make_rule=lambda units, values: QuantileRule(units, values, q=Q),
                explain=lambda results, read: run_explainer(choice, results, pickled(read)))
    whole, _, seconds = run_passes(plan, backend.input_spec())
    parts, _, _ = run_passes(plan, backend.input_spec(), shards=split_shards(IMAGES, 3, 6))
    assert "explain" in seconds
    for name in whole:
        assert whole[name].explanations == parts[name].explanations
        assert whole[name].explanations


# ---- planted units -------------------------------------------------------------------------------------------


PLANTED = ("red-c AND ball", "ball OR box", "(ball OR box) AND NOT red-c")


class LookupModel(nn.Module):
    """Units that fire exactly on given formulas: each image is recognised among the dataset's (nearest in
    pixels) and the unit's map is the formula's mask at label resolution (1 inside, 0 outside)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images)  # (X, 3, H, W) RGB in [0, 1]
        self.register_buffer("targets", targets)  # (X, U, sh, sw)
        self.units = nn.Identity()

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = normalised * std + mean
        if x.shape[-2:] != self.images.shape[-2:]:  # the backend's shape probe
            return self.units(self.targets[:1].expand(x.shape[0], -1, -1, -1) * 0)
        distance = torch.cdist(x.flatten(1), self.images.flatten(1))
        return self.units(self.targets[distance.argmin(dim=1)])


def planted_model(root: Path) -> LookupModel:
    dataset = BrodenDataset(root)
    images, targets = [], []
    for i in range(len(dataset)):
        sample = dataset.load(i)
        images.append(torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float() / 255)
        masks = []
        for given in PLANTED:
            masks.append(_sample_mask(parse(given, dataset.vocabulary), sample.layers, sample.image_labels))
        targets.append(torch.from_numpy(np.stack(masks)).float())
    return LookupModel(torch.stack(images), torch.stack(targets)).eval()


def _sample_mask(formula: Formula, layers: np.ndarray, image_labels: Sequence[int]) -> np.ndarray:
    if isinstance(formula, Leaf):
        return (layers == formula.label).any(axis=0) | (formula.label in image_labels)
    left = _sample_mask(formula.left, layers, image_labels)
    right = _sample_mask(formula.right, layers, image_labels)
    return {AND: left & right, OR: left | right, AND_NOT: left & ~right}[formula.op]


@pytest.mark.slow
def test_planted_formulas_are_found(tmp_path: Path) -> None:
    root = generate_concept_set(tmp_path / "set", images=60, image_size=64, seed=5)
    model = planted_model(root)
    # q above every planted mask's share of pixels: each threshold is 0, each mask the formula's exactly.
    result = netdissection.dissect(model, dataset=str(root), layers=["units"], quantile=0.2, workers=0,
                                   explain="compositional", explain_params={"formula_length": 3, "beam": 5})
    layer = result.layers["units"]
    np.testing.assert_array_equal(layer.thresholds, 0)
    vocabulary = layer.vocabulary
    rows = {r.unit: r for r in layer.explanations or ()}
    for unit, given in enumerate(PLANTED, start=1):
        row = rows[unit]
        assert canonical(parse(row.formula, vocabulary)) == canonical(parse(given, vocabulary)), (given, row)
        assert row.iou == 1.0 and row.label_iou < 1.0, row
        assert row.length == len(leaves(parse(given, vocabulary)))


# ---- files, reports, the store, the job key --------------------------------------------------------------------


def test_cli_run_writes_explanations_and_reports_them(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = write_random_broden(tmp_path / "data", images=6, image_size=32, label_size=16, seed=2)
    out = tmp_path / "out"
    args = ("resnet18", "--layer", "layer1", "--dataset", data, "--workers", "0", "--explain", "compositional",
            "--formula-length", "2", "--beam", "2", "--units", "1-3,7", "--out", out)
    code, _, err = run_cli(*args)
    assert code == 0, err
    path = out / "layer1" / "explanations.csv"
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["unit", "formula", "iou", "length", "label", "label_iou"]
    assert [int(r["unit"]) for r in table] == [1, 2, 3, 7]
    with open(out / "layer1" / "tally.csv", newline="") as f:
        tally = {r["unit"]: r for r in csv.DictReader(f)}
    for row in table:
        assert row["label"] == tally[row["unit"]]["label"]
        assert float(row["label_iou"]) == float(tally[row["unit"]]["score"])
        assert float(row["iou"]) >= float(row["label_iou"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["explainer"] == {"name": "compositional", "plugin": "compositional",
                                                  "params": {"formula_length": 2, "beam": 2, "formula": None},
                                                  "units": [1, 2, 3, 7]}
    assert "layer1/explanations.csv" in summary["written"]
    page = (out / "report.html").read_text()
    assert page.count('class="formula"') == 4
    assert f">{_html(table[0]['formula'])} <span" in page
    # Rebuilt from disk, the reports keep them; the same run again comes from the store, explanations and all.
    code, _, err = run_cli("report", out)
    assert code == 0, err
    assert [(e.unit, e.formula) for e in read_explanations(path)] == [(int(r["unit"]), r["formula"]) for r in table]
    assert (out / "report.html").read_text().count('class="formula"') == 4
    again = tmp_path / "again"
    code, stdout, err = run_cli(*args[:-1], again)
    assert code == 0 and "from the results store" in stdout, err
    assert (again / "layer1" / "explanations.csv").read_text() == path.read_text()
    # Without --explain the run is another job (and writes no explanations).
    code, stdout, err = run_cli(*args[:7], "--out", tmp_path / "plain")
    assert code == 0 and "from the results store" not in stdout, err
    assert not (tmp_path / "plain" / "layer1" / "explanations.csv").exists()


def test_compare_explains_each_run_as_dissect_does(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`dissect compare --explain`: every run's explanations are those of the model's own `dissect` run with the
    same options; an explainer's option without --explain is one line, exit 2, before any model runs."""
    data = write_random_broden(tmp_path / "data", images=6, image_size=32, label_size=16, seed=2)
    explain = ("--explain", "compositional", "--formula-length", "2", "--beam", "2", "--units", "1-3")
    common = ("--layer", "layer1", "--dataset", data, "--workers", "0", "--no-store")
    code, _, err = run_cli("resnet18", *common, *explain, "--out", tmp_path / "own")
    assert code == 0, err
    code, _, err = run_cli("compare", "resnet18", *common, *explain, "--out", tmp_path / "cmp")
    assert code == 0, err
    own, run = tmp_path / "own", tmp_path / "cmp" / "runs" / "resnet18"
    expected = (own / "layer1" / "explanations.csv").read_bytes()
    assert (run / "layer1" / "explanations.csv").read_bytes() == expected
    assert [line.split(",")[0] for line in expected.decode().splitlines()[1:]] == ["1", "2", "3"]
    explainer = json.loads((own / "summary.json").read_text())["provenance"]["explainer"]
    assert json.loads((run / "summary.json").read_text())["provenance"]["explainer"] == explainer
    code, _, err = run_cli("compare", "resnet18", *common, "--beam", "2", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "--beam", "--explain")
    assert not (tmp_path / "bad").exists()


def _html(value: str) -> str:
    import html

    return html.escape(value, quote=True)


def test_the_explainer_enters_the_job_key(tmp_path: Path) -> None:
    host = netdissection.build_host(entry_points=False)
    data = generate_concept_set(tmp_path / "set", images=4, image_size=16, seed=0)
    rule = {"name": "quantile", "params": {"q": 0.005}}
    base = Job(model="resnet18", dataset=str(data))
    material = key_material(base, host, rule)
    assert "explain" not in material  # the keys of runs without an explainer are what they were
    explained = replace(base, explain="compositional")

    def key(job: Job) -> str:
        return key_of(key_material(job, host, rule))

    assert key(explained) != key(base)
    # Defaults named or not: the same job.
    assert key(replace(explained, explain_params={"formula_length": 3, "beam": 5})) == key(explained)
    changed = [replace(explained, explain_params={"beam": 4}), replace(explained, explain_params={"formula_length": 2}),
               replace(explained, explain_units=(1, 2)), replace(explained, explain_params={"formula": "ball"})]
    keys = {key(job) for job in changed}
    assert key(explained) not in keys and len(keys) == len(changed)


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture
def small(random_broden) -> Path:  # type: ignore[no-untyped-def]
    return random_broden(images=4, image_size=32, label_size=16)


@pytest.mark.parametrize(("options", "needles"), [
    (("--explain", "compositionl"), ("unknown explainer 'compositionl'", "compositional")),
    (("--explain", "compositional", "--formula-length", "0"), ("--formula-length", "at least 1")),
    (("--explain", "compositional", "--beam", "0"), ("--beam", "at least 1")),
    (("--explain", "compositional", "--explain-param", "depth=2"), ("no parameter 'depth'", "formula_length")),
    (("--explain", "compositional", "--units", "0,3"), ("--units 0", "from 1")),
    (("--explain", "compositional", "--units", "a,b"), ("--units", "'a'")),
    (("--explain", "compositional", "--compat", "lite"), ("--compat lite",)),
    (("--formula-length", "3",), ("--formula-length", "--explain")),
    (("--units", "3",), ("--units", "--explain")),
])
def test_bad_options_fail_in_one_line(run_cli, small: Path, tmp_path: Path, options: tuple[str, ...],  # type: ignore[no-untyped-def]
                                      needles: tuple[str, ...]) -> None:
    code, _, err = run_cli("resnet18", "--dataset", small, "--out", tmp_path / "o", *options)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_units_outside_the_layer_and_unknown_concepts_fail_in_one_line(run_cli, small: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common = ("resnet18", "--dataset", small, "--layer", "layer1", "--workers", "0", "--explain", "compositional")
    code, _, err = run_cli(*common, "--units", "5,65", "--out", tmp_path / "a")
    assert_one_line_error(code, err, "--units 65", "'layer1' has 64 units")
    code, _, err = run_cli(*common, "--explain-param", "formula=red-c AND carr", "--out", tmp_path / "b")
    assert_one_line_error(code, err, "unknown concept 'carr'", "'car'")
    code, _, err = run_cli(*common, "--explain-param", "formula=red-c AND (car OR", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "formula", "ends where a concept should be")
    for out in ("a", "b", "c"):
        assert not (tmp_path / out / "summary.json").exists()


def test_formula_text_round_trips(setup: Setup) -> None:
    vocabulary = setup.vocabulary
    names = vocabulary.names()
    for source in ("car", "red-c AND car", "car OR tree OR wood", "(car OR tree) AND NOT red-c",
                   "(red-c AND car) OR tree", "car AND NOT red-c AND NOT blue-c", "car AND (tree OR wood)"):
        formula = parse(source, vocabulary)
        assert text(formula, names) == source
        assert parse(text(formula, names), vocabulary) == formula
    # Precedence: AND binds tighter than OR; the same formula up to order has one key.
    assert parse("car OR tree AND wood", vocabulary) == parse("car OR (tree AND wood)", vocabulary)
    assert canonical(parse("car AND NOT red-c AND tree", vocabulary)) == \
        canonical(parse("tree AND car AND NOT red-c", vocabulary))
    assert canonical(parse("car OR tree", vocabulary)) != canonical(parse("car AND tree", vocabulary))


def test_the_plugins_listing_shows_the_explainer(run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli("plugins", "--json")
    assert code == 0
    listing = json.loads(out)
    assert [e["name"] for e in listing["components"]["explainer"]] == ["compositional"]
    compositional_plugin = next(p for p in listing["plugins"] if p["name"] == "compositional")
    assert compositional_plugin["provides"] == ["explainer:compositional"]


def test_dead_units_and_no_pixels_are_explained_with_zero(setup: Setup) -> None:
    """A unit whose mask is empty over the dataset keeps IoU 0 whatever the formula (no division by zero)."""
    quiet = nn.Sequential(setup.model[0], nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        quiet[2].weight.zero_()
        quiet[2].bias.fill_(-1.0)  # constant maps: the threshold is their value, nothing is above it
    result = netdissection.dissect(quiet, dataset=str(setup.root), layers=["2"], quantile=Q, workers=0,
                                   explain="compositional", explain_params={"formula_length": 2, "beam": 2})
    rows = result.layers["2"].explanations or []
    assert [r.iou for r in rows] == [0.0, 0.0] and all(r.length == 1 for r in rows)



def test_signatures_are_exact_even_when_the_hash_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    from netdissection.plugins.explainers import counts

    rows = torch.tensor([[1, 2], [2, 1], [1, 2], [0, 0], [3, 0]])
    for mix in (counts._MIX, torch.zeros_like(counts._MIX)):  # zeros: every row hashes alike
        monkeypatch.setattr(counts, "_MIX", mix)
        inverse, table, weight = counts.signatures(rows)
        assert torch.equal(table[inverse], rows)
        assert len(table) == 4 and sorted(weight.tolist()) == [1, 1, 1, 2]
