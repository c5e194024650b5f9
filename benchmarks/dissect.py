"""Dissection speed and memory against the model's own forward pass.

    python benchmarks/dissect.py                      # resnet18 layer3+layer4, 300 images at 224/112
    python benchmarks/dissect.py --images 1000
    python benchmarks/dissect.py --memory 500 5000    # peak memory at two dataset sizes (64 px images)

Each measurement runs in a fresh process so that peak RSS belongs to it alone. The baseline is a
plain forward pass of the same model over the same images, through the same loader (decoding in
the same worker processes, the same batch size and preprocessing), with nothing else done.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _dataset(images: int, size: int) -> Path:
    from netdissection.plugins.datasets.generated import generate_concept_set

    root = Path(tempfile.gettempdir()) / f"netdissection-bench-{images}-{size}"
    if not (root / "index.csv").is_file():
        generate_concept_set(root, images=images, image_size=size, seed=0)
    return root


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_forward(model: str, images: int, size: int, batch_size: int, workers: int) -> dict[str, float]:
    """A plain forward pass over the dataset, through the dissection's own loader and preprocessing."""
    import torch

    from netdissection.core import loading
    from netdissection.core.scheduler import preprocess
    from netdissection.core.types import BackendOptions
    from netdissection.plugins.backends.torchvision_backend import TorchvisionBackend
    from netdissection.plugins.datasets.broden import BrodenDataset

    backend = TorchvisionBackend(model, BackendOptions())
    dataset = BrodenDataset(_dataset(images, size))
    spec = backend.input_spec()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loading.iterate(dataset, batch_size=batch_size, workers=workers, image=True, labels=False,
                                     skip_bad=False):
            x = preprocess(batch.images, spec, "cpu").contiguous(memory_format=torch.channels_last)
            backend.model(x)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": images / seconds, "peak_mb": _peak_mb()}


def measure_dissection(model: str, layers: list[str], images: int, size: int, batch_size: int,
                       workers: int) -> dict[str, float]:
    import torchvision  # noqa: F401  (imports are not part of either timing)

    import netdissection
    import netdissection.core.run

    data = _dataset(images, size)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = netdissection.dissect(model, dataset=str(data), layers=layers, out=out, batch_size=batch_size,
                                       workers=workers)
        seconds = time.perf_counter() - start
    s = result.seconds
    return {"seconds": seconds, "activations_s": s["activations"], "thresholds_s": s["thresholds"],
            "iou_s": s["iou"], "passes_s": s["passes"], "reports_s": s["reports"],
            "setup_s": seconds - s["passes"] - s["reports"], "images_per_s": images / seconds,
            "peak_mb": _peak_mb()}


def _child(kind: str, **kwargs: object) -> dict[str, float]:
    """Run one measurement in a fresh interpreter; it prints its figures as JSON."""
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import dissect as b; "
            f"print(json.dumps(b.measure_{kind}(**{kwargs!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    _dataset(args.images, args.size)  # generate outside the timings
    common = dict(model=args.model, images=args.images, size=args.size, batch_size=args.batch_size,
                  workers=args.workers)
    forward = _child("forward", **common)
    dissection = _child("dissection", layers=args.layers, **common)
    table = Table(title=f"{args.model} {'+'.join(args.layers)}, {args.images} generated images at "
                        f"{args.size} px (labels {args.size // 2} px), batch {args.batch_size}, "
                        f"{args.workers} loader workers")
    for column in ("measure", "seconds", "images/s", "× forward"):
        table.add_column(column, justify="right")
    f = forward["seconds"]
    table.add_row("plain forward pass", f"{f:.1f}", f"{args.images / f:.1f}", "1.00")
    for label, key in (("activation pass", "activations_s"), ("thresholds", "thresholds_s"),
                       ("IoU pass", "iou_s"), ("dissection: all passes", "passes_s"),
                       ("setup (model, dataset index)", "setup_s"), ("reports (tally, HTML, plots)", "reports_s")):
        seconds = dissection[key]
        per_image = f"{args.images / seconds:.1f}" if key.endswith(("ons_s", "iou_s", "passes_s")) else "-"
        table.add_row(label, f"{seconds:.2f}", per_image, f"{seconds / f:.2f}",
                      style="bold" if key == "passes_s" else None)
    table.add_row("end to end", f"{dissection['seconds']:.1f}", f"{dissection['images_per_s']:.1f}",
                  f"{dissection['seconds'] / f:.2f}")
    Console().print(table)
    print(f"peak RSS: forward {forward['peak_mb']:.0f} MB, dissection {dissection['peak_mb']:.0f} MB")
    print(f"ratio of the dissection passes to the forward pass = {dissection['passes_s'] / f:.2f} (goal ≤ 1.5)")


def memory(args: argparse.Namespace) -> None:
    sizes = args.memory
    print(f"peak RSS of a dissection ({args.model} {'+'.join(args.layers)}, images at 64 px):")
    results = {}
    for n in sizes:
        _dataset(n, 64)
        results[n] = _child("dissection", model=args.model, layers=args.layers, images=n, size=64,
                            batch_size=args.batch_size, workers=args.workers)
        print(f"  {n:6d} images: {results[n]['peak_mb']:.0f} MB peak, {results[n]['seconds']:.1f} s")
    first, last = results[sizes[0]]["peak_mb"], results[sizes[-1]]["peak_mb"]
    print(f"peak grows {last - first:+.0f} MB ({last / first:.2f}×) for {sizes[-1] / sizes[0]:.0f}× the images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--memory", type=int, nargs="+", metavar="N", help="peak memory at these dataset sizes")
    args = parser.parse_args()
    if args.memory:
        memory(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
