"""Run NetDissect-Lite (the reference implementation) on a Broden-format set, for side-by-side timings.

    git clone https://github.com/CSAILVision/NetDissect-Lite /tmp/NetDissect-Lite
    python benchmarks/netdissect_lite.py --lite /tmp/NetDissect-Lite --dataset SET --weights resnet18.pt \\
        --layers layer4 layer3 --out /tmp/lite-out

Lite's code is not part of this project. ``netdissect_lite.patch`` (beside this file) is the least it needs to
run on current Python, NumPy, SciPy-less installs and PyTorch; it is applied to the checkout on first use:

- ``scipy.misc.imread/imresize/imsave`` (removed from SciPy) become the same operations on Pillow
  (``util/compat.py``; bilinear resizing as before) and SciPy's ``zoom`` is imported where it is used
  (never, at the image size the data has);
- ``Variable(volatile=True)`` (ignored since PyTorch 0.4) becomes ``torch.set_grad_enabled(False)``, what
  it meant; ``raise StopIteration`` in generators (an error since Python 3.7) becomes ``return``;
  ``numpy.NaN`` (gone in NumPy 2) ``numpy.nan``; the one-hot label-to-category matrix is indexed with a
  tuple (with a list, NumPy ≥ 1.23 silently fills it with ones);
- ``quantile.npy`` and ``tally.csv`` are named per layer: Lite caches them under one name, so a second
  layer would reuse the first layer's thresholds and tally instead of computing its own.

This script writes Lite's ``settings.py`` for the run (model, layers, data, output folder, CPU, batch
size, every category), loads the weights into torchvision's model as Lite does (``MODEL_FILE``), runs Lite's
``main.py`` unchanged otherwise, and writes the seconds of each of Lite's stages to ``OUT/stages.json``.
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

PATCH = Path(__file__).resolve().with_name("netdissect_lite.patch")
CATEGORIES = ["object", "part", "scene", "material", "texture", "color"]


def ensure_patched(checkout: Path) -> None:
    """Apply the patch to a clean checkout; accept one where it is applied already."""
    if not (checkout / "feature_operation.py").is_file():
        raise SystemExit(f"{checkout} is not a NetDissect-Lite checkout (no feature_operation.py)")
    if (checkout / "util" / "compat.py").is_file():
        return
    git = ["git", "-C", str(checkout), "apply"]
    check = subprocess.run([*git, "--check", str(PATCH)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise SystemExit(f"cannot apply {PATCH.name} to {checkout}: {check.stderr.strip()}")
    subprocess.run([*git, str(PATCH)], check=True)


def settings_text(args: argparse.Namespace) -> str:
    values = {
        "GPU": False, "TEST_MODE": False, "CLEAN": True, "MODEL": args.model, "DATASET": "imagenet",
        "QUANTILE": 0.005, "SEG_THRESHOLD": 0.04, "SCORE_THRESHOLD": 0.04, "TOPN": 10, "PARALLEL": 1,
        "CATAGORIES": CATEGORIES, "OUTPUT_FOLDER": str(args.out), "DATA_DIRECTORY": str(args.dataset),
        "IMG_SIZE": args.size, "NUM_CLASSES": 1000, "FEATURE_NAMES": list(args.layers),
        "MODEL_FILE": str(args.weights), "MODEL_PARALLEL": False, "WORKERS": args.workers,
        "BATCH_SIZE": args.batch_size, "TALLY_BATCH_SIZE": 16, "TALLY_AHEAD": 4, "INDEX_FILE": "index.csv",
    }
    return "".join(f"{name} = {value!r}\n" for name, value in values.items())


def timed(owner: object, name: str, stages: dict[str, float], stage: str) -> None:
    """Wrap ``owner.name`` so that its seconds add up under ``stages[stage]``."""
    original = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lite", type=Path, required=True, help="a NetDissect-Lite checkout")
    parser.add_argument("--dataset", type=Path, required=True, help="a Broden-format folder")
    parser.add_argument("--weights", type=Path, required=True, help="a torchvision state dict of --model")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer4"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    checkout = args.lite.resolve()
    ensure_patched(checkout)
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "settings"
    config.mkdir(exist_ok=True)
    (config / "settings.py").write_text(settings_text(args))
    sys.path[:0] = [str(config), str(checkout)]  # this settings.py before the checkout's own

    import feature_operation
    import visualize.report

    stages: dict[str, float] = {}
    timed(feature_operation.FeatureOperator, "feature_extraction", stages, "features")
    timed(feature_operation.FeatureOperator, "quantile_threshold", stages, "quantile")
    timed(feature_operation.FeatureOperator, "tally", stages, "tally")
    timed(visualize.report, "generate_html_summary", stages, "html")
    start = time.perf_counter()
    runpy.run_path(str(checkout / "main.py"), run_name="__main__")
    stages["total"] = time.perf_counter() - start
    (args.out / "stages.json").write_text(json.dumps(stages))


if __name__ == "__main__":
    main()
