"""Compositional explanations: search time per unit at formula length 3, beam 5.

    python benchmarks/compositional.py                        # resnet18 layer4 (512 units), 300 images at 224/112
    python benchmarks/compositional.py --images 100 --units 1-64
    python benchmarks/compositional.py --layer layer3 --length 2

One dissection with ``--explain compositional`` on the generated concept set (seeded random weights): the
explainer's time (``seconds["explain"]``: its reads of the dataset — length − 1 of them, each from the
activation cache — and the search) divided by the units explained, beside the ordinary IoU pass of the
same run, which reads the dataset once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _dataset(images: int, size: int) -> Path:
    from netdissection.plugins.datasets.generated import generate_concept_set

    root = Path(tempfile.gettempdir()) / f"netdissection-bench-{images}-{size}"
    if not (root / "index.csv").is_file():
        generate_concept_set(root, images=images, image_size=size, seed=0)
    return root


def measure(model: str, layer: str, images: int, size: int, length: int, beam: int, units: str | None,
            batch_size: int, workers: int) -> dict[str, object]:
    import torchvision  # noqa: F401  (imports are not part of the timing)

    import netdissection

    data = _dataset(images, size)
    start = time.perf_counter()
    result = netdissection.dissect(model, dataset=str(data), layers=[layer], batch_size=batch_size, workers=workers,
                                   explain="compositional", explain_params={"formula_length": length, "beam": beam},
                                   explain_units=units)
    wall = time.perf_counter() - start
    layer_result = next(iter(result.layers.values()))
    rows = layer_result.explanations or []
    seconds = result.seconds
    longer = sum(r.length > 1 for r in rows)
    gain = sum(r.iou - r.label_iou for r in rows) / max(1, len(rows))
    return {
        "model": model, "layer": layer, "images": result.images, "image_size": size, "units_explained": len(rows),
        "formula_length": length, "beam": beam, "wall_s": round(wall, 2),
        "iou_pass_s": round(seconds["iou"], 2), "explain_s": round(seconds["explain"], 2),
        "explain_per_unit_ms": round(1000 * seconds["explain"] / max(1, len(rows)), 2),
        "explain_per_read_vs_iou_pass": round(seconds["explain"] / max(1, length - 1) / seconds["iou"], 2),
        "units_with_a_longer_formula": longer, "mean_iou_gain": round(gain, 4),
        "examples": [f"unit {r.unit}: {r.formula} ({r.iou:.3f}; label {r.label} {r.label_iou:.3f})"
                     for r in sorted(rows, key=lambda r: r.label_iou - r.iou)[:5]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--length", type=int, default=3)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--units", help="units to explain, e.g. 1-64 (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    figures = measure(args.model, args.layer, args.images, args.size, args.length, args.beam, args.units,
                      args.batch_size, args.workers)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
