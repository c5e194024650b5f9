"""Dissection speed per backend, against each backend's own plain forward pass.

    python benchmarks/backends.py                   # 128 generated images at 224 px (labels 112), batch 32
    python benchmarks/backends.py --images 512 --only onnx timm:efficientnet_b0 --repeat 3

For every (backend, model): the model's plain forward pass over the images, through the dissection's own
loader and preprocessing (same worker processes, batch size, normalisation; the torch models in the memory
format the backend runs them in; the ONNX graph as exported, through an InferenceSession of its own),
then a whole dissection of the default layer (the activation pass, the thresholds, the IoU pass; model
construction and reports excluded). The ratio is dissection seconds over forward seconds: 1.0 would mean
the dissection costs no more than running the model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree too

log = logging.getLogger("benchmarks.backends")

#: (backend, model) pairs; an ONNX model is the torchvision model of that name, exported with dynamic axes.
CONFIGS = ("torchvision:resnet18", "timm:resnet18", "timm:efficientnet_b0", "onnx:resnet18")


@dataclass
class Row:
    config: str
    layer: str
    forward_s: float
    activations_s: float
    dissection_s: float


def concept_set(images: int, size: int) -> Path:
    from netdissection.plugins.datasets.generated import generate_concept_set

    root = Path(tempfile.gettempdir()) / f"netdissection-bench-{images}-{size}"
    if not (root / "index.csv").is_file():
        log.info("generating %d images of %d px in %s", images, size, root)
        generate_concept_set(root, images=images, image_size=size, seed=0)
    return root


def export_resnet(name: str, folder: Path) -> Path:
    """A seeded torchvision model exported with a dynamic batch and size (the TorchScript exporter)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, input_names=["image"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    return path


def plain_forward(backend_name: str, model_ref: str, data: Path, batch_size: int, workers: int) -> float:
    """Seconds for the model's own forward pass over the data, through the dissection's loader."""
    import torch

    from netdissection.core import loading
    from netdissection.core.scheduler import preprocess
    from netdissection.core.types import BackendOptions
    from netdissection.plugins.datasets.broden import BrodenDataset
    from netdissection.registry import build_host

    backend = build_host().catalog("backend").get(backend_name).factory(model_ref, BackendOptions())
    spec = backend.input_spec()
    run: Any
    if backend_name == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(model_ref, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> None:
            session.run(None, {input_name: x.numpy()})
    else:
        channels_last = getattr(backend, "_channels_last", False)

        def run(x: torch.Tensor) -> None:
            backend.model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    dataset = BrodenDataset(data)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loading.iterate(dataset, batch_size=batch_size, workers=workers, image=True, labels=False,
                                     skip_bad=False):
            run(preprocess(batch.images, spec, "cpu"))
    return time.perf_counter() - started


def dissection(backend_name: str, model_ref: str, data: Path, batch_size: int, workers: int) -> tuple[str, dict]:
    import netdissection

    result = netdissection.dissect(model_ref, backend=backend_name, dataset=str(data), batch_size=batch_size,
                                   workers=workers)
    return next(iter(result.layers)), result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="generated images (default 128: about 2 minutes)")
    parser.add_argument("--size", type=int, default=224, help="image size (labels are half of it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: the tool's)")
    parser.add_argument("--only", nargs="*", default=None, help=f"configs to run, of: {', '.join(CONFIGS)}")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs of each (a noisy machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from rich.console import Console
    from rich.table import Table

    from netdissection.core.loading import default_workers

    workers = default_workers() if args.workers is None else args.workers
    configs = [c for c in CONFIGS if not args.only or c in args.only or c.split(":")[0] in args.only]
    data = concept_set(args.images, args.size)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            backend_name, model = config.split(":")
            model_ref = str(export_resnet(model, Path(tmp))) if backend_name == "onnx" else model
            best: Row | None = None
            for _ in range(max(1, args.repeat)):  # alternate, so that a burst of load hits both alike
                log.info("%s: plain forward pass", config)
                forward_s = plain_forward(backend_name, model_ref, data, args.batch_size, workers)
                log.info("%s: dissection", config)
                layer, seconds = dissection(backend_name, model_ref, data, args.batch_size, workers)
                passes = seconds["activations"] + seconds["thresholds"] + seconds["iou"]
                best = Row(config, layer, min(forward_s, best.forward_s) if best else forward_s,
                           min(seconds["activations"], best.activations_s) if best else seconds["activations"],
                           min(passes, best.dissection_s) if best else passes)
            assert best is not None
            rows.append(best)

    n = args.images
    table = Table(title=f"{n} images of {args.size} px (labels {args.size // 2} px), batch {args.batch_size}, "
                        f"{workers} loader workers, {torch.get_num_threads()} torch threads")
    for column in ("backend:model", "layer", "forward img/s", "activation pass img/s", "dissection img/s",
                   "dissection / forward"):
        table.add_column(column, justify="left" if column in ("backend:model", "layer") else "right")
    for r in rows:
        table.add_row(r.config, r.layer, f"{n / r.forward_s:.1f}", f"{n / r.activations_s:.1f}",
                      f"{n / r.dissection_s:.1f}", f"{r.dissection_s / r.forward_s:.2f}×")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
