"""What ``--bootstrap`` costs: memory against the number of images, and time against the plain run.

    python benchmarks/bootstrap.py                       # both parts, defaults below
    python benchmarks/bootstrap.py --memory 500 2000 4000
    python benchmarks/bootstrap.py --speed --images 300 --repeats 2

Memory (``--memory N...``): the IoU pass alone at Broden's scale — 512 units with 7×7 maps, Broden's 1,197
concepts in six categories, 112 px label maps with four pixel layers and image-level scene/texture labels
(random, Broden-like), no model — counted into the run's sums (``TallyCounts``) and into the bootstrap's
blocks (``BlockCounts``, then 200 resamples), each in a fresh process for each number of images, so that
its peak RSS is its own. The bootstrap's memory is its blocks (50 × units × concepts int32) whatever N.

Speed (``--speed``): whole dissections of resnet18 (seeded weights) on a generated concept set, with and
without ``--bootstrap 200``, alternated (A B A B ...) in fresh processes; the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: Broden's 1,197 concepts, by primary category (pixel-level first; scene and texture are image-level).
CATEGORIES = {"object": 508, "part": 234, "material": 32, "color": 11, "scene": 365, "texture": 47}
UNITS, MAP, LABEL, BATCH = 512, 7, 112, 32


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vocabulary() -> Any:
    from netdissection.core.types import Concept, Vocabulary

    concepts, number = [], 1
    for category, count in CATEGORIES.items():
        for _ in range(count):
            concepts.append(Concept(number, f"{category}-{number}", category, (category,)))
            number += 1
    return Vocabulary(tuple(CATEGORIES), tuple(concepts))


def _label_pool(vocabulary: Any, batches: int, seed: int) -> list[tuple[Any, Any]]:
    """Prepared label batches (reused in turn, so that the pool, not N, sets their memory)."""
    import numpy as np
    import torch

    from netdissection.core.iou import prepare_labels

    rng = np.random.default_rng(seed)
    first: dict[str, int] = {}
    number = 1
    for category, count in CATEGORIES.items():
        first[category] = number
        number += count

    def pick(category: str) -> int:
        return first[category] + int(rng.integers(CATEGORIES[category]))

    def rectangles(layer: np.ndarray, category: str, count: int) -> None:
        for _ in range(count):
            y, x = rng.integers(0, LABEL, 2)
            h, w = rng.integers(8, LABEL // 2, 2)
            layer[y:y + h, x:x + w] = pick(category)

    category_of = torch.from_numpy(vocabulary.primary_category_index())
    pool = []
    for _ in range(batches):
        layers = np.zeros((BATCH, 4, LABEL, LABEL), dtype=np.int64)
        levels = np.zeros((BATCH, 2), dtype=np.int64)
        for i in range(BATCH):
            layers[i, 0] = pick("object")
            rectangles(layers[i, 0], "object", 4)
            rectangles(layers[i, 1], "part", 2)
            rectangles(layers[i, 2], "material", 2)
            cells = np.array([pick("color") for _ in range(9)]).reshape(3, 3)
            layers[i, 3] = np.kron(cells, np.ones((LABEL // 3 + 1, LABEL // 3 + 1), dtype=np.int64))[:LABEL, :LABEL]
            levels[i] = [pick("scene"), pick("texture") if rng.random() < 0.3 else 0]
        pool.append(prepare_labels(torch.from_numpy(layers), torch.from_numpy(levels), category_of,
                                   len(CATEGORIES), "paper"))
    return pool


def measure_iou_pass(images: int, bootstrap: int) -> dict[str, float]:
    """The IoU pass over ``images`` synthetic images into the run's sums, or (``bootstrap`` > 0) into the
    blocks, followed by the resampling; seconds and peak RSS."""
    import numpy as np
    import torch

    from netdissection.core.bootstrap import BootstrapSpec
    from netdissection.core.iou import TallyCounts
    from netdissection.core.types import LayerResult

    torch.set_num_threads(2)
    vocabulary = _vocabulary()
    pool = _label_pool(vocabulary, 8, seed=0)
    thresholds = {"layer4": np.full(UNITS, 2.5758)}  # the top 0.5% of a standard normal
    spec = BootstrapSpec(bootstrap) if bootstrap else None
    counts = spec.accumulator(images)(thresholds, vocabulary, "paper") if spec else TallyCounts(
        thresholds, vocabulary, "paper")
    generator = torch.Generator().manual_seed(1)
    baseline = _peak_mb()
    started = time.perf_counter()
    for start in range(0, images, BATCH):
        indices = np.arange(start, min(images, start + BATCH))
        labels, truth = pool[(start // BATCH) % len(pool)]
        n = len(indices)
        if n < BATCH:
            from netdissection.core.iou import LabelBatch

            labels = LabelBatch(labels.layers[:n], labels.image_labels[:n], labels.has_category[:n], labels.shape,
                                labels.truth[:n])
            truth = labels.truth.sum(dim=0)
        counts.add_truth(indices, truth)
        counts.add("layer4", indices, torch.randn(n, UNITS, MAP, MAP, generator=generator), labels)
    partial = counts.partial()
    iou_seconds = time.perf_counter() - started
    resampling = 0.0
    if spec is not None:
        started = time.perf_counter()
        layer = partial.layers["layer4"]
        result = LayerResult("layer4", vocabulary, thresholds["layer4"], layer.intersection, partial.truth,
                             layer.activation)
        spec.attach({"layer4": result}, partial)
        resampling = time.perf_counter() - started
    return {"iou_s": iou_seconds, "resampling_s": resampling, "peak_mb": _peak_mb(), "baseline_mb": baseline}


def _dataset(images: int, size: int) -> Path:
    from netdissection.plugins.datasets.generated import generate_concept_set

    root = Path(tempfile.gettempdir()) / f"netdissection-bench-{images}-{size}"
    if not (root / "index.csv").is_file():
        generate_concept_set(root, images=images, image_size=size, seed=0)
    return root


def measure_dissection(images: int, size: int, bootstrap: int, workers: int) -> dict[str, float]:
    import torchvision  # noqa: F401  (imports are not part of either timing)

    import netdissection

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = netdissection.dissect("resnet18", dataset=str(_dataset(images, size)), out=out, workers=workers,
                                       reporters=["tally"], bootstrap=bootstrap)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, **{f"{k}_s": v for k, v in result.seconds.items()}, "peak_mb": _peak_mb()}


def _child(kind: str, **kwargs: object) -> dict[str, float]:
    """One measurement in a fresh interpreter; it prints its figures as JSON."""
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bootstrap as b; "
            f"print(json.dumps(b.measure_{kind}(**{kwargs!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(sizes: list[int], resamples: int) -> None:
    from netdissection.core.bootstrap import BLOCKS

    concepts = sum(CATEGORIES.values())
    blocks_mb = BLOCKS * UNITS * (concepts + 1) * 4 / 2**20
    print(f"IoU pass alone: {UNITS} units ({MAP}×{MAP} maps), {concepts} concepts, {LABEL} px labels; "
          f"the bootstrap's blocks take {blocks_mb:.0f} MB ({BLOCKS} × {UNITS} × {concepts + 1} int32)")
    print(f"{'images':>7} {'plain peak':>11} {'bootstrap peak':>15} {'difference':>11} "
          f"{'plain IoU s':>12} {'blocks IoU s':>13} {'ratio':>6} {'resampling s':>13}")
    rows = []
    for n in sizes:
        plain = _child("iou_pass", images=n, bootstrap=0)
        boot = _child("iou_pass", images=n, bootstrap=resamples)
        rows.append((n, plain, boot))
        extra = boot["peak_mb"] - plain["peak_mb"]
        print(f"{n:7d} {plain['peak_mb']:9.0f}MB {boot['peak_mb']:13.0f}MB {extra:+9.0f}MB "
              f"{plain['iou_s']:12.1f} {boot['iou_s']:13.1f} "
              f"{boot['iou_s'] / plain['iou_s']:6.2f} {boot['resampling_s']:13.1f}")
    (n0, _, first), (n1, _, last) = rows[0], rows[-1]
    print(f"bootstrap peak grows {last['peak_mb'] - first['peak_mb']:+.0f} MB for {n1 / n0:.0f}× the images")


def speed(images: int, size: int, repeats: int, resamples: int, workers: int) -> None:
    _dataset(images, size)  # generated outside the timings
    times: dict[int, list[dict[str, float]]] = {0: [], resamples: []}
    for _ in range(repeats):
        for b in (0, resamples):
            times[b].append(_child("dissection", images=images, size=size, bootstrap=b, workers=workers))

    def median(b: int, key: str) -> float:
        return statistics.median(t.get(key, 0.0) for t in times[b])

    print(f"resnet18 layer4, {images} generated images at {size} px, {repeats} alternations (medians):")
    for key in ("seconds", "iou_s", "bootstrap_s", "passes_s", "peak_mb"):
        plain, boot = median(0, key), median(resamples, key)
        ratio = f"{boot / plain:.2f}×" if plain else "-"
        print(f"  {key:12s} plain {plain:8.1f}   --bootstrap {resamples} {boot:8.1f}   {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, nargs="+", metavar="N", help="IoU-pass memory at these sizes")
    parser.add_argument("--speed", action="store_true", help="whole dissections with and without the bootstrap")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    both = not args.memory and not args.speed
    if args.memory or both:
        memory(args.memory or [500, 2000, 4000], args.resamples)
    if args.speed or both:
        speed(args.images, args.size, args.repeats, args.resamples, args.workers)


if __name__ == "__main__":
    main()
