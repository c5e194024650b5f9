"""An early layer at Broden scale: memory that does not grow with the dataset, thresholds still exact.

    python benchmarks/broden_scale.py                          # resnet18 conv1, 2,000 and 20,000 images at 112 px
    python benchmarks/broden_scale.py --images 500 5000 --size 64             # a quicker look

An early layer is where the exact quantile is hard: resnet18 ``conv1`` has 64 units with 56×56 maps at 112 px,
so on 20,000 images each unit's threshold (the top 0.5% of its 62.7 million values) is decided by its largest
314,000 values, 80 MB for the layer: past the running top-k's cap (32 MB a layer), where the radix selection
takes over with histograms whose size does not depend on the dataset. At 2,000 images the top-k still holds.

For each dataset size (a Broden-hard set, ``broden_hard.py``), this runs the ``dissect`` command on ``conv1``
(tally and thresholds; ``--cache auto``) as a whole process and records its peak RSS (``peak.py``). Then it
checks every unit's threshold against ``numpy.quantile`` over all of that unit's values as float64 (the
protocol's definition, as ``tests/test_quantile.py`` states it), computed here: the same images in the same
batches through the backend's own forward pass (so the maps are the run's, bit for bit), written unit by unit
to a file in the temp folder (N·h·w·4 bytes per unit), then each unit's values read back whole.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import broden_hard  # noqa: E402
import dissect as bench  # noqa: E402

from netdissection.core.results import load_run  # noqa: E402
from netdissection.plugins.thresholds.quantile import QuantileRule  # noqa: E402

MODEL = bench.Model("resnet18", "torchvision", ("conv1",))
QUANTILE = 0.005  # the protocol's default q


def dissect(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """The dissect command on conv1: its wall seconds and peak RSS in MB."""
    argv = ["-m", "netdissection.cli", "run", MODEL.name, "--backend", MODEL.backend, "--weights",
            str(bench.weights(MODEL)), "--dataset", str(data), "--layer", "conv1", "--out", str(out), "--no-store",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--report", "tally",
            "--report", "thresholds"]
    seconds, peak, _output = bench.run(argv, out.parent)
    return seconds, peak["peak_mb"]


def reference_thresholds(data: Path, args: argparse.Namespace, scratch: Path) -> np.ndarray:
    """numpy.quantile of each unit's values, from the backend's own maps of the dataset, unit by unit."""
    import torch

    from netdissection import api
    from netdissection.core import loading
    from netdissection.core.scheduler import preprocess

    prepared = api.prepare(MODEL.name, backend=MODEL.backend, weights=str(bench.weights(MODEL)), dataset=str(data),
                           layers=["conv1"], batch_size=args.batch_size, workers=args.workers)
    plan = prepared.plan
    values: np.memmap | None = None
    done = 0
    for batch in loading.iterate(plan.dataset, batch_size=plan.batch_size, workers=plan.workers, image=True,
                                 labels=False, skip_bad=False):
        with torch.inference_mode():
            maps = plan.backend.activations(preprocess(batch.images, prepared.spec, "cpu"), ["conv1"])["conv1"]
        maps = maps.float().numpy()  # (B, units, h, w)
        b, units, h, w = maps.shape
        if values is None:
            per_unit = len(plan.dataset) * h * w
            values = np.memmap(scratch / "values.f32", dtype=np.float32, mode="w+", shape=(units, per_unit))
        values[:, done * h * w:(done + b) * h * w] = maps.transpose(1, 0, 2, 3).reshape(units, -1)
        done += b
    assert values is not None and done == len(plan.dataset)
    values.flush()
    return np.array([np.quantile(values[u].astype(np.float64), 1 - QUANTILE) for u in range(values.shape[0])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", type=int, default=112, help="image size (labels at half of it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"resnet18 conv1 (64 units, {args.size // 2}×{args.size // 2} maps), Broden-hard images at {args.size} px, "
          f"batch {args.batch_size}, {args.workers} loader workers; {bench.load()}", flush=True)
    peaks: dict[int, float] = {}
    for n in args.images:
        data = broden_hard.cached(n, args.size)
        with tempfile.TemporaryDirectory(prefix="bench-broden-scale-") as tmp:
            work = Path(tmp) / "run"
            work.mkdir()
            seconds, peaks[n] = dissect(data, work / "out", args)
            thresholds = load_run(work / "out").layers["conv1"].thresholds
            start = time.perf_counter()
            expected = reference_thresholds(data, args, Path(tmp))
            checked = time.perf_counter() - start
            equal = int(np.sum(np.asarray(thresholds, dtype=np.float64) == expected))
            mode = QuantileRule(len(expected), n * (args.size // 2) ** 2, q=QUANTILE).mode  # what the run used
            print(f"  {n:6d} images: dissection {seconds:.0f} s, peak RSS {peaks[n]:.0f} MB; thresholds ({mode}) "
                  f"bit-equal to numpy.quantile for {equal} of {len(expected)} units (reference {checked:.0f} s)",
                  flush=True)
            if equal != len(expected):
                worst = np.max(np.abs(np.asarray(thresholds, dtype=np.float64) - expected))
                print(f"    differ by up to {worst:.3g}: {json.dumps(list(map(float, expected[:4])))} ...")
            shutil.rmtree(work, ignore_errors=True)
    first, last = peaks[args.images[0]], peaks[args.images[-1]]
    print(f"peak RSS {last:.0f} MB at {args.images[-1]} images against {first:.0f} MB at {args.images[0]}: "
          f"{last / first:.3f}× for {args.images[-1] / args.images[0]:.0f}× the images")


if __name__ == "__main__":
    main()
