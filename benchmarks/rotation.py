"""The cost of ``--rotate`` as a ratio to the plain run, and of building the rotation per layer width.

    python benchmarks/rotation.py                           # resnet18 layer4 + layer3, 300 generated images
    python benchmarks/rotation.py --images 60 --repeats 1 --widths 256,512,1024

Two measurements:

1. whole processes, plain ``dissect MODEL --no-store`` against ``--rotate 0.5`` and ``--rotate 1``, run in
   turn (A B C A B C ...) so that a busy machine slows each alike; for each, the median wall time and the
   seconds of each pass from its summary.json (the transform runs in the activation pass; the rotated maps
   change how much of each map the IoU pass evaluates);
2. in this process, the time to build one layer's Q^α (a Haar draw, the real Schur form, the power) per
   width: paid once per layer, seed and process, whatever the dataset size.

Timings on a shared machine are noisy: run it when the machine is quiet, or read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _dataset(images: int, size: int) -> Path:
    from netdissection.plugins.datasets.generated import generate_concept_set

    root = Path(tempfile.gettempdir()) / f"netdissection-bench-{images}-{size}"
    if not (root / "index.csv").is_file():
        generate_concept_set(root, images=images, image_size=size, seed=0)
    return root


def _run(args: list[str], out: Path) -> dict[str, float]:
    """``dissect ARGS --out OUT`` as a process: its wall time and the seconds of its passes."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "netdissection.cli", *args, "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"}, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dissect {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    seconds = json.loads((out / "summary.json").read_text())["seconds"]
    return {"wall": wall, **{k: float(v) for k, v in seconds.items()}}


def build_times(widths: list[int]) -> dict[int, dict[str, float]]:
    from netdissection.core.rotation import Rotation, layer_matrix

    times = {}
    for width in widths:
        started = time.perf_counter()
        layer_matrix(Rotation(0.5, seed=width), "bench", width)  # a fresh seed: nothing cached
        fractional = time.perf_counter() - started
        started = time.perf_counter()
        layer_matrix(Rotation(1.0, seed=width + 1), "bench", width)  # α = 1 needs no Schur form
        full = time.perf_counter() - started
        started = time.perf_counter()
        layer_matrix(Rotation(0.7, seed=width), "bench", width)  # the same Q: its planes are kept
        again = time.perf_counter() - started
        times[width] = {"fractional": fractional, "full": full, "next_alpha": again}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", default="layer4,layer3", help="comma-separated")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the three runs")
    parser.add_argument("--widths", default="256,512,1024,2048", help="layer widths to time the rotation's build")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    dataset = _dataset(args.images, args.size)
    layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    common = [args.model, "--dataset", str(dataset), "--no-store", "--report", "tally",
              *(a for layer in layers for a in ("--layer", layer))]
    variants = {"plain": [], "rotate 0.5": ["--rotate", "0.5"], "rotate 1": ["--rotate", "1"]}
    work = Path(tempfile.mkdtemp(prefix="netdissection-bench-rotation-"))
    print(f"{args.model} {', '.join(layers)} × {args.images} images of {args.size} px, {args.repeats} alternations; "
          f"work folder {work}")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, extra in variants.items():
            runs[name].append(_run([*common, *extra], work / f"{name.replace(' ', '_')}_{repeat}"))
            print(f"  {name:<11} run {repeat + 1}: {runs[name][-1]['wall']:6.1f} s wall", flush=True)

    def median(name: str, field: str) -> float:
        return statistics.median(r.get(field, 0.0) for r in runs[name])

    plain_wall, plain_passes = median("plain", "wall"), median("plain", "passes")
    print(f"\n{'':<11} {'wall s':>8} {'× plain':>8} {'passes s':>9} {'× plain':>8} {'activations':>12} {'IoU':>7}")
    figures: dict[str, object] = {"model": args.model, "layers": layers, "images": args.images, "size": args.size,
                                  "runs": runs}
    for name in variants:
        wall, passes = median(name, "wall"), median(name, "passes")
        print(f"{name:<11} {wall:8.1f} {wall / plain_wall:8.2f} {passes:9.1f} {passes / plain_passes:8.2f} "
              f"{median(name, 'activations'):12.1f} {median(name, 'iou'):7.1f}")
        figures[f"{name} ratio"] = {"wall": wall / plain_wall, "passes": passes / plain_passes}

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    print("\nbuilding one layer's Q^α (once per layer, seed and process):")
    built = build_times(widths)
    for width, t in built.items():
        print(f"  {width:5d} units: 0 < α < 1 {t['fractional']:6.2f} s (Schur form), α = 1 {t['full']:6.2f} s, "
              f"another α of the same Q {t['next_alpha']:5.2f} s")
    figures["build_seconds"] = built
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
