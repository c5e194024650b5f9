"""What the activation pass keeps besides the forward pass, per batch: the threshold rule, the top images, the
per-unit statistics, at a layer's size and a dataset's.

    python benchmarks/activation_state.py                       # resnet18 layer3 and layer4, 2,000 and 20,000 images
    python benchmarks/activation_state.py --images 63305 --batches 200   # a sample of Broden's size

Batches of 32 maps of ReLU'd normal noise (half the values zero, the rest spread like real activations),
fresh for every batch, go through each state's ``update`` as the scheduler feeds them; the seconds of each
state are summed over the batches of one pass (``--batches`` measures the first ones only and scales up) and
the rule's ``finish`` is timed once. The quantile rule's running top-k needs q·N·h·w values per unit, so its
cost per batch is what grows with the dataset.
"""

from __future__ import annotations

import argparse
import time

LAYERS = {"layer3": (256, 14, 14), "layer4": (512, 7, 7)}  # resnet18 at 224 px: (units, h, w)


def measure(images: int, units: int, h: int, w: int, batch: int, batches: int | None) -> dict[str, float]:
    import numpy as np
    import torch

    from netdissection.core.diagnostics import UnitStatistics
    from netdissection.core.topimages import TopImagesPartial
    from netdissection.plugins.thresholds.quantile import QuantileRule

    rule = QuantileRule(units, images * h * w)
    top = TopImagesPartial.empty(units, 10, (h, w))
    statistics = UnitStatistics()
    generator = torch.Generator().manual_seed(0)
    seconds = {"rule": 0.0, "top images": 0.0, "statistics": 0.0}
    total = images // batch
    run = min(total, batches) if batches else total
    for i in range(run):
        acts = torch.relu(torch.randn(batch, units, h, w, generator=generator))
        indices = np.arange(i * batch, (i + 1) * batch)
        start = time.perf_counter()
        rule.update(acts)
        middle = time.perf_counter()
        top.update(acts, indices)
        late = time.perf_counter()
        statistics.update(acts)
        end = time.perf_counter()
        seconds["rule"] += middle - start
        seconds["top images"] += late - middle
        seconds["statistics"] += end - late
    scale = total / run
    seconds = {name: value * scale for name, value in seconds.items()}
    start = time.perf_counter()
    if run == total:
        rule.finish()
    seconds["rule finish"] = time.perf_counter() - start
    seconds["rule buffer MB"] = rule.buffer_bytes / 2**20
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, help="measure only the first BATCHES batches and scale up")
    args = parser.parse_args()
    import torch

    print(f"batches of {args.batch_size}, {torch.get_num_threads()} torch threads")
    for images in args.images:
        for layer in args.layers:
            units, h, w = LAYERS[layer]
            figures = measure(images, units, h, w, args.batch_size, args.batches)
            text = ", ".join(f"{name} {value:.2f} {'MB' if 'MB' in name else 's'}".replace(" MB MB", " MB")
                             for name, value in figures.items())
            print(f"{images:6d} images, {layer} ({units} × {h} × {w}): {text}", flush=True)


if __name__ == "__main__":
    main()
