"""How long the reports of a real run take: resnet18 layer4+layer3 on 300 images (768 units, 7,680 thumbnails).

    python benchmarks/report.py                          # Broden-hard images (benchmarks/broden_hard.py)
    python benchmarks/report.py --dataset builtin        # the built-in generated set
    python benchmarks/report.py --baseline OLD_CHECKOUT  # against another version, in alternation, same content?

The run is dissected once (seeded random weights, tally and thresholds only) and kept in the temp folder.
Then each repeat rebuilds every default report of it in a fresh process, as ``dissect`` writes them at
the end of a run (``write_reports``: counts, tally, thresholds, plots, HTML with its strips, summary),
timing the whole and each writer, imports of matplotlib and Pillow included (a run pays them too), in a
process that holds what a run holds at that point (torch and the model).

With ``--baseline``, the same is measured with the ``netdissection`` package of another checkout, the two
alternating (so load on the machine hits both alike), and the outputs are compared: the same page, the same
SVG bytes, the same PNG and strip pixels (JPEG bytes may differ; their decoded pixels may not).
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import broden_hard  # noqa: E402

# The child: rebuild the reports of RUN into OUT with the netdissection importable from CODE; print timings.
CHILD = r"""
import json, os, shutil, sys, time
from pathlib import Path
code, run, out = sys.argv[1:4]
sys.path.insert(0, code)
import netdissection.api as api
from netdissection.core.results import load_run
from netdissection.registry import build_host

shutil.copytree(run, out)
# Hold what a run holds when it writes its reports (torch, the model: ~1 GB that worker processes fork from).
import torch, torchvision
model = torchvision.models.resnet18()
with torch.inference_mode():
    model(torch.zeros(2, 3, 224, 224))
host = build_host()
result = load_run(Path(out))
seconds = {}
make_writers = api.make_writers

def timed(*args, **kwargs):  # each writer made as a run makes it, its write timed
    chosen = make_writers(*args, **kwargs)
    for choice in chosen:
        def write(result, out_dir, _write=choice.writer.write, _name=choice.name):
            start = time.perf_counter()
            try:
                return _write(result, out_dir)
            finally:
                seconds[_name] = time.perf_counter() - start
        choice.writer.write = write
    return chosen

api.make_writers = timed
def cpu():  # this process and the worker processes it waited for
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

start, started_cpu = time.perf_counter(), cpu()
api.write_reports(result, Path(out), host=host)
seconds["all"], seconds["cpu"] = time.perf_counter() - start, cpu() - started_cpu
print(json.dumps(seconds))
"""


def finished_run(dataset: str, images: int) -> Path:
    """A resnet18 layer4+layer3 run on the set, with its saved counts and top images (made once)."""
    import dissect as bench

    if dataset == "builtin":
        from netdissection.plugins.datasets.generated import default_concept_set

        data, key = default_concept_set(), "builtin"
    else:
        data, key = broden_hard.cached(images), f"broden-hard-{images}"
    run = Path(tempfile.gettempdir()) / f"netdissection-bench-report-run-{key}"
    if not (run / "summary.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        model = bench.MODELS["resnet18"]
        subprocess.run([sys.executable, "-m", "netdissection.cli", "run", model.name, "--weights",
                        str(bench.weights(model)), "--dataset", str(data), "--layer", "layer4", "--layer", "layer3",
                        "--out", str(run), "--report", "tally", "--report", "thresholds"], check=True,
                       stdout=subprocess.DEVNULL)
    return run


def rebuild(code: Path, run: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(code), str(run), str(out)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def plot_copies(names: set[str]) -> set[str]:
    """The PNG copies of SVG plots among ``names`` (written by default before --plot-format)."""
    return {name for name in names if name.endswith(".png") and name[:-4] + ".svg" in names}


def same_content(a: Path, b: Path) -> list[str]:
    """What differs between two report folders: pages, SVG bytes, PNG and JPEG pixels; [] when nothing.
    PNG copies of the plots that only one side wrote do not count (they are written on request now)."""
    import numpy as np
    from PIL import Image

    left, right = files(a), files(b)
    copies = plot_copies(set(left)) ^ plot_copies(set(right))
    problems = [f"only in one: {name}" for name in sorted((set(left) ^ set(right)) - copies)]

    def summary(p: Path) -> dict[str, object]:  # its seconds differ by nature; its file list by the copies
        data = {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
        data["written"] = [name for name in data.get("written", []) if name not in copies]
        return data

    for name in sorted(set(left) & set(right)):
        x, y = left[name], right[name]
        if name.endswith((".jpg", ".png")):
            same = np.array_equal(np.asarray(Image.open(x).convert("RGB")), np.asarray(Image.open(y).convert("RGB")))
        elif name == "summary.json":
            same = summary(x) == summary(y)
        else:
            same = x.read_bytes() == y.read_bytes()
        if not same:
            problems.append(f"differs: {name}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["broden-hard", "builtin"], default="broden-hard")
    parser.add_argument("--images", type=int, default=300, help="images of the Broden-hard set")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="another checkout to compare with")
    args = parser.parse_args()

    run = finished_run(args.dataset, args.images)
    summary = json.loads((run / "summary.json").read_text())
    units = sum(layer["units"] for layer in summary["layers"])
    print(f"reports of resnet18 layer4+layer3 on {summary['images']} {args.dataset} images: {units} units, "
          f"{10 * units} thumbnails; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    versions = {"this checkout": HERE.parent}
    if args.baseline is not None:
        versions = {"baseline": args.baseline.resolve(), **versions}
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for name, code in versions.items():  # in alternation
                timings[name].append(rebuild(code, run, Path(tmp) / name))
        for name, runs in timings.items():
            keys = [k for k in runs[0] if k not in ("all", "cpu")]
            parts = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in keys)
            wall = [r["all"] for r in runs]
            print(f"{name:14s} reports {statistics.median(wall):.2f} s (range {min(wall):.2f}–{max(wall):.2f}, "
                  f"CPU {statistics.median(r['cpu'] for r in runs):.2f} s with its workers); {parts}")
        out = Path(tmp) / "this checkout"
        pages = files(out)
        strips = [p for n, p in pages.items() if n.endswith(".jpg")]
        print(f"{len(pages)} files, {sum(p.stat().st_size for p in pages.values()) / 1e6:.1f} MB; "
              f"{len(strips)} strips, {sum(p.stat().st_size for p in strips) / 1e6:.1f} MB; report.html "
              f"{(out / 'report.html').stat().st_size / 1e3:.0f} kB")
        if args.baseline is not None:
            problems = same_content(Path(tmp) / "baseline", out)
            copies = plot_copies(set(files(Path(tmp) / "baseline"))) ^ plot_copies(set(pages))
            but = f", but for {len(copies)} PNG copies of plots that only one side wrote" if copies else ""
            print(f"content identical to the baseline's{but}" if not problems else
                  f"content differs from the baseline's in {len(problems)} files: {'; '.join(problems[:8])}")


if __name__ == "__main__":
    main()
