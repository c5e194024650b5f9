"""A dissection end to end against a plain forward pass of the same model, and against NetDissect-Lite.

    python benchmarks/dissect.py                                 # 2,000 Broden-hard images, 2 rounds, 3 models
    python benchmarks/dissect.py --images 300 --rounds 1 --models resnet18      # a quick check
    python benchmarks/dissect.py --lite /tmp/NetDissect-Lite     # NetDissect-Lite beside resnet18
    python benchmarks/dissect.py --memory 2000 20000 --size 64   # peak RSS at two dataset sizes
    python benchmarks/dissect.py --runtimes torch onnxruntime    # the dissection on each --runtime

Every measurement is a whole process, timed from start to exit by this script, on the same images (a
Broden-hard set from ``broden_hard.py``: Broden's vocabulary, label layers and distinct labels per image,
224 px images with labels at 112 px) with the same seeded random weights:

- forward: ``plain_forward.py``, what anyone would write: a torch DataLoader decoding the JPEGs with
  Pillow, the model in eval mode under ``torch.inference_mode()``; none of netdissection's code;
- dissection: the ``dissect`` command, with every default report (tally, thresholds, plots, HTML), once per
  ``--runtimes`` entry (torch: the model's eager code; onnxruntime: exported in memory; auto), each
  runtime's thresholds and labels checked against the torch run's;
- lite: NetDissect-Lite (``netdissect_lite.py``; resnet18 only, when ``--lite`` names a checkout).

The kinds run in alternation (forward, dissection, lite, forward, dissection, lite, ...) so that load from
other processes hits every side alike; each ratio is taken within a round (the processes ran next to each
other) and reported as the median and range over rounds. The dissection's own split (passes, reports, the
rest: interpreter, imports, model, index, exit) comes from its summary.json. Peak RSS is each main
process's own (``peak.py``), loader workers apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import broden_hard  # noqa: E402


@dataclass(frozen=True)
class Model:
    name: str
    backend: str  # torchvision or timm
    layers: tuple[str, ...]


MODELS = {m.name: m for m in (
    Model("resnet18", "torchvision", ("layer4", "layer3")),
    Model("vit_small_patch16_224", "timm", ("blocks.11",)),
    Model("convnext_tiny", "timm", ("stage:-1",)),
)}


@dataclass
class Measured:
    """One process: wall seconds, its own peak RSS, and what it reported (summary seconds, stages...)."""

    seconds: float
    peak_mb: float
    details: dict[str, float] = field(default_factory=dict)


def weights(model: Model) -> Path:
    """Seeded random weights as a state dict file, shared by every side (made once, in the temp folder)."""
    path = Path(tempfile.gettempdir()) / f"netdissection-bench-{model.name}-seed0.pt"
    if not path.is_file():
        import torch
        from plain_forward import build

        torch.manual_seed(0)
        net, _mean, _std = build(model.name, model.backend == "timm", None)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
    return path


def run(argv: list[str], work: Path) -> tuple[float, dict[str, Any], str]:
    """Run ``python benchmarks/peak.py REPORT argv...``; its wall seconds, the peak report, its output."""
    report, log = work / "peak.json", work / "output.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(HERE / "peak.py"), str(report), *argv], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{text[-3000:]}")
    return seconds, json.loads(report.read_text()), text


def measure(kind: str, model: Model, data: Path, args: argparse.Namespace, keep: Path | None = None) -> Measured:
    """``kind``: forward, lite, or dissection@RUNTIME."""
    common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        work = Path(tmp)
        out = work / "out"
        if kind == "forward":
            argv = [str(HERE / "plain_forward.py"), "--dataset", str(data), "--model", model.name,
                    "--weights", str(weights(model)), *common, *(["--timm"] if model.backend == "timm" else [])]
        elif kind.startswith("dissection"):
            # --no-store: every round computes (a later round would otherwise be read from the results store).
            argv = ["-m", "netdissection.cli", "run", model.name, "--backend", model.backend, "--weights",
                    str(weights(model)), "--dataset", str(data), "--out", str(out), "--no-store", *common,
                    "--runtime", kind.partition("@")[2] or "torch"]
            for layer in model.layers:
                argv += ["--layer", layer]
        else:
            argv = [str(HERE / "netdissect_lite.py"), "--lite", str(args.lite), "--dataset", str(data), "--model",
                    model.name, "--weights", str(weights(model)), "--out", str(out), "--layers", *model.layers,
                    *common]
        seconds, peak, output = run(argv, work)
        details: dict[str, float] = {}
        if kind == "forward":
            details = json.loads(output.strip().splitlines()[-1])
        elif kind.startswith("dissection"):
            summary = json.loads((out / "summary.json").read_text())
            details = dict(summary["seconds"])
            details["runtime"] = summary["provenance"]["backend_details"].get("runtime", "torch")
            if keep is not None:  # the thresholds, for the mask-activity probe and the runtimes' check
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(out, keep, ignore=shutil.ignore_patterns("report_files", "*.png", "*.svg"))
        else:
            details = json.loads((out / "stages.json").read_text())
        return Measured(seconds, peak["peak_mb"], details)


# -------------------------------------------------------------------------------------------- reporting


def spread(values: list[float], digits: int = 1) -> str:
    """Median and range."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def report_model(model: Model, runs: dict[str, list[Measured]], images: int) -> None:
    from rich.console import Console
    from rich.table import Table

    forward, lite = runs["forward"], runs.get("lite", [])
    table = Table(title=f"{model.name} {'+'.join(model.layers)}: {images} images, {len(forward)} round(s); "
                        "seconds: median (range)")
    table.add_column("process")
    for column in ("seconds", "images/s", "peak RSS MB", "× forward"):
        table.add_column(column, justify="right")

    def per_round(side: list[Measured], base: list[Measured]) -> list[float]:
        return [s.seconds / b.seconds for s, b in zip(side, base, strict=True)]

    def row(label: str, side: list[Measured], ratio: str, style: str | None = None) -> None:
        seconds = [m.seconds for m in side]
        table.add_row(label, spread(seconds), f"{images / statistics.median(seconds):.1f}",
                      spread([m.peak_mb for m in side], 0), ratio, style=style)

    row("plain forward pass (torch DataLoader)", forward, "1.00")
    dissections = {kind: side for kind, side in runs.items() if kind.startswith("dissection")}
    for kind, dissection in dissections.items():
        ran_on = "/".join(sorted({str(m.details.get("runtime")) for m in dissection}))
        requested = kind.partition("@")[2]
        on = f"--runtime {requested}" + (f" → {ran_on}" if ran_on != requested else "")
        row(f"dissection end to end ({on}, all reports)", dissection, spread(per_round(dissection, forward), 2),
            style="bold")
        for label, key in (("  activation pass", "activations"), ("  thresholds", "thresholds"),
                           ("  IoU pass", "iou"), ("  all passes", "passes"), ("  reports", "reports")):
            values = [m.details.get(key, float("nan")) for m in dissection]
            ratios = [v / f.seconds for v, f in zip(values, forward, strict=True)]
            table.add_row(label, spread(values, 2), "", "", spread(ratios, 2))
        rest = [m.seconds - m.details.get("passes", 0) - m.details.get("reports", 0) for m in dissection]
        table.add_row("  the rest (start, imports, model, index, exit)", spread(rest, 2), "", "", "")
    if lite:
        row("NetDissect-Lite", lite, spread(per_round(lite, forward), 2))
        for key in ("features", "quantile", "tally", "html"):
            values = [m.details.get(key, float("nan")) for m in lite]
            table.add_row(f"  {key}", spread(values, 2), "", "", "")
    Console(width=140, emoji=False, highlight=False).print(table)
    for kind, dissection in dissections.items():
        passes = [m.details["passes"] / f.seconds for m, f in zip(dissection, forward, strict=True)]
        print(f"{model.name} --runtime {kind.partition('@')[2]}: dissection ÷ forward = "
              f"{spread(per_round(dissection, forward), 2)}; passes ÷ forward = {spread(passes, 2)}"
              + (f"; Lite ÷ dissection = {spread(per_round(lite, dissection), 2)}" if lite else ""))


def check_runtimes(model: Model, kept: dict[str, Path]) -> None:
    """Each runtime's dissection against the torch one: thresholds (relative) and the labels of the units
    whose best IoU beats the runner-up by more than 1e-3 (closer ones may swap on float rounding)."""
    import numpy as np

    from netdissection import load_results
    from netdissection.core.scores import iou_matrix

    if "dissection@torch" not in kept:
        return
    eager = load_results(kept["dissection@torch"])
    for kind, folder in kept.items():
        if kind == "dissection@torch":
            continue
        other = load_results(folder)
        for name, layer in eager.layers.items():
            theirs = other.layers[name]
            relative = float(np.max(np.abs(theirs.thresholds - layer.thresholds)
                                    / np.maximum(np.abs(layer.thresholds), 1e-12)))
            iou_a, iou_b = iou_matrix(layer), iou_matrix(theirs)
            ordered = np.sort(iou_a, axis=1)
            clear = ordered[:, -1] - ordered[:, -2] > 1e-3
            same = float(np.mean(iou_a[clear].argmax(axis=1) == iou_b[clear].argmax(axis=1)))
            print(f"  {model.name} {name} --runtime {kind.partition('@')[2]} against torch: thresholds within "
                  f"{relative:.1e} relative; {100 * same:.1f}% of the {int(clear.sum())} units with a clear best "
                  "label have the same label")


def mask_activity(model: Model, data: Path, results: Path, images: int) -> None:
    """How often units fire: the fraction of (image, unit) pairs whose map peaks above the unit's threshold
    (the pairs the IoU pass must upsample) and of label pixels inside the masks, with the dissection's
    thresholds. With a top quantile q, a unit fires on at most q·h·w of the images on average."""
    import numpy as np
    import torch

    from netdissection.core.scheduler import preprocess
    from netdissection.core.types import BackendOptions
    from netdissection.plugins.datasets.broden import BrodenDataset
    from netdissection.registry import build_host

    summary = json.loads((results / "summary.json").read_text())
    backend = build_host().catalog("backend").get(model.backend).factory(
        model.name, BackendOptions(weights=str(weights(model))))
    dataset = BrodenDataset(data)
    count = min(images, len(dataset))
    spec = backend.input_spec()
    for record in summary["layers"]:
        layer, folder = record["layer"], record["folder"]
        thresholds = np.loadtxt(results / folder / "thresholds.csv", delimiter=",", skiprows=1, ndmin=2)[:, 1]
        t = torch.from_numpy(thresholds).float()
        fired = pairs = on = pixels = 0
        shape = (0, 0)
        with torch.inference_mode():
            for start in range(0, count, 16):
                samples = [dataset.load(i, image=True, labels=False) for i in range(start, min(count, start + 16))]
                x = preprocess(torch.from_numpy(np.stack([s.image for s in samples])), spec, "cpu")
                acts = torch.as_tensor(backend.activations(x, [layer])[layer]).float()
                shape = tuple(acts.shape[2:])
                fired += int((acts.amax(dim=(2, 3)) > t[None]).sum())
                pairs += acts.shape[0] * acts.shape[1]
                for chunk in acts.split(4):
                    up = torch.nn.functional.interpolate(chunk, size=samples[0].label_shape, mode="bilinear",
                                                         align_corners=False)
                    on += int((up > t[None, :, None, None]).sum())
                    pixels += up.numel()
        q = summary["provenance"].get("threshold_rule", {}).get("q", 0.005)
        bound = min(1.0, q * shape[0] * shape[1])
        print(f"mask activity, {model.name} {layer} ({shape[0]}×{shape[1]} maps, first {count} images): units fire "
              f"on {100 * fired / pairs:.1f}% of (image, unit) pairs (at most {100 * bound:.1f}% on any data: q·h·w), "
              f"{100 * on / pixels:.2f}% of label pixels inside the masks")


# -------------------------------------------------------------------------------------------------- modes


def speed(args: argparse.Namespace) -> None:
    models = [MODELS[name] for name in args.models]
    data = broden_hard.cached(args.images, args.size)
    print(f"data: Broden-hard, {broden_hard.describe(broden_hard.cached_statistics(data))}")
    print(f"batch {args.batch_size}, {args.workers} loader workers, {args.rounds} round(s); {load()} at the start")
    dissections = [f"dissection@{runtime}" for runtime in args.runtimes]
    kinds = {m.name: ["forward", *dissections] + (["lite"] if args.lite and m.backend == "torchvision" else [])
             for m in models}
    for m in models:
        weights(m)
    runs: dict[str, dict[str, list[Measured]]] = {m.name: {k: [] for k in kinds[m.name]} for m in models}
    keep = Path(tempfile.mkdtemp(prefix="bench-results-"))
    try:
        for r in range(args.rounds):
            for m in models:
                for kind in kinds[m.name]:
                    kept = keep / m.name / kind if kind.startswith("dissection") else None
                    result = measure(kind, m, data, args, keep=kept)
                    runs[m.name][kind].append(result)
                    print(f"  round {r + 1} {m.name} {kind}: {result.seconds:.1f} s, {result.peak_mb:.0f} MB",
                          flush=True)
        print(f"{load()} at the end")
        for m in models:
            report_model(m, runs[m.name], args.images)
        for m in models:
            check_runtimes(m, {kind: keep / m.name / kind for kind in dissections})
        for m in models:
            mask_activity(m, data, keep / m.name / dissections[0], min(args.images, 300))
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def memory(args: argparse.Namespace) -> None:
    model = MODELS[args.models[0]]
    print(f"peak RSS, {model.name} {'+'.join(model.layers)}, Broden-hard images at {args.size} px, "
          f"batch {args.batch_size}, {args.workers} loader workers; {load()}")
    peaks: dict[int, dict[str, float]] = {}
    for n in args.memory:
        data = broden_hard.cached(n, args.size)
        forward = measure("forward", model, data, args)
        dissection = measure(f"dissection@{args.runtimes[0]}", model, data, args)
        peaks[n] = {"forward": forward.peak_mb, "dissection": dissection.peak_mb}
        print(f"  {n:6d} images: forward {forward.peak_mb:.0f} MB ({forward.seconds:.0f} s), dissection "
              f"{dissection.peak_mb:.0f} MB ({dissection.seconds:.0f} s): {dissection.peak_mb / forward.peak_mb:.3f}×")
    first, last = peaks[args.memory[0]]["dissection"], peaks[args.memory[-1]]["dissection"]
    print(f"dissection peak grows {last - first:+.0f} MB ({last / first:.3f}×) for "
          f"{args.memory[-1] / args.memory[0]:.0f}× the images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="image size (labels at half of it)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of every kind of process")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="loader processes, for every side")
    parser.add_argument("--lite", type=Path, metavar="CHECKOUT", help="a NetDissect-Lite checkout to run beside")
    parser.add_argument("--memory", type=int, nargs="+", metavar="N", help="peak RSS at these dataset sizes")
    parser.add_argument("--runtimes", nargs="+", default=["torch"], choices=["torch", "onnxruntime", "auto"],
                        help="a dissection per --runtime (the first one for --memory)")
    args = parser.parse_args()
    if args.memory:
        memory(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
