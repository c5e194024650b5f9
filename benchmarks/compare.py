"""The cost of `dissect compare` beyond the dissections themselves, and of a comparison read from the store.

    python benchmarks/compare.py                     # 8 timm models × 300 generated images at 224 px
    python benchmarks/compare.py --images 60 --models timm:resnet10t,timm:convnext_atto
    python benchmarks/compare.py --executor local,ray --shards 2   # also on a local Ray instance, 2 shards a model

Three measurements, each a whole process (what a user pays, imports included):

1. every model alone, ``dissect MODEL --no-store`` in its own process (the shell loop a comparison replaces);
   each run's summary.json gives the seconds of its passes (activations, thresholds, IoU);
2. ``dissect compare`` of all the models into an empty store; its overhead per model is
   (compare's wall time − the sum of the single runs' passes) / models — the goal is under 1 s;
3. the same ``dissect compare`` again: every job is read from the store (goal: under 5 s in all).

With ``--executor local,ray``, 2 and 3 are measured for each executor (``ray``: a local Ray instance started by
the comparison, each model's dataset in ``--shards`` shards, one worker process each); figures of an executor
other than ``local`` are prefixed with its name.

Timings on a shared machine are noisy: run it when the machine is quiet, or read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("timm:resnet10t", "timm:resnet18", "timm:efficientnet_b0", "timm:mobilenetv3_large_100",
          "timm:convnext_atto", "timm:vit_tiny_patch16_224", "timm:regnetx_002", "timm:ghostnet_100")


def _dataset(images: int, size: int) -> Path:
    from netdissection.plugins.datasets.generated import generate_concept_set

    root = Path(tempfile.gettempdir()) / f"netdissection-bench-{images}-{size}"
    if not (root / "index.csv").is_file():
        generate_concept_set(root, images=images, image_size=size, seed=0)
    return root


def _dissect(*args: str) -> float:
    """Run ``dissect ARGS`` as a process; its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "netdissection.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dissect {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (BACKEND:NAME)")
    parser.add_argument("--workers", type=int, default=None, help="data loading processes (default: the CLI's)")
    parser.add_argument("--executor", default="local", help="comma-separated executors to time compare on")
    parser.add_argument("--shards", type=int, default=2, help="shards per model for the ray executor")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dataset = _dataset(args.images, args.size)
    common = ["--dataset", str(dataset)] + (["--workers", str(args.workers)] if args.workers is not None else [])
    work = Path(tempfile.mkdtemp(prefix="netdissection-bench-compare-"))
    print(f"{len(models)} models × {args.images} images of {args.size} px; work folder {work}")
    load = os.getloadavg()[0]  # the machine's load says how far the figures are from a quiet machine's

    singles = {}
    for model in models:
        backend, name = model.split(":", 1) if ":" in model else (None, model)
        out = work / "single" / name
        wall = _dissect(name, *(["--backend", backend] if backend else []), *common, "--no-store", "--out", str(out))
        seconds = json.loads((out / "summary.json").read_text())["seconds"]
        singles[name] = {"wall": wall, "passes": seconds["passes"]}
        print(f"  {name:<28} alone: {wall:6.1f} s wall, {seconds['passes']:6.1f} s passes")
    passes = sum(s["passes"] for s in singles.values())
    loop = sum(s["wall"] for s in singles.values())

    print(f"single processes (the shell loop): {loop:.1f} s in all, of which passes {passes:.1f} s")
    figures: dict[str, object] = {"models": len(models), "images": args.images, "size": args.size,
                                  "load_average_1min_at_start": round(load, 1),
                                  "single_runs_wall_s": round(loop, 1), "single_runs_passes_s": round(passes, 1)}
    for executor in [e.strip() for e in args.executor.split(",") if e.strip()]:
        own = _compare(executor, models, common, work, args.shards, loop, passes)
        figures.update(own if executor == "local" else {f"{executor}_{k}": v for k, v in own.items()})
    figures["load_average_1min_at_end"] = round(os.getloadavg()[0], 1)
    print(f"load average (1 min) at the start {load:.1f}, at the end {figures['load_average_1min_at_end']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


def _compare(executor: str, models: list[str], common: list[str], work: Path, shards: int, loop: float,
             passes: float) -> dict[str, object]:
    """``dissect compare`` of the models on ``executor`` into an empty store, then again from the store."""
    store = work / f"store-{executor}"
    compare_args = ["compare", *models, *common, "--store", str(store), "--executor", executor,
                    *(["--shards", str(shards)] if executor == "ray" else [])]
    first_out, second_out = work / f"compare-{executor}-1", work / f"compare-{executor}-2"
    first = _dissect(*compare_args, "--out", str(first_out))
    rows = json.loads((first_out / "compare.json").read_text())["rows"]
    second = _dissect(*compare_args, "--out", str(second_out))
    cached = json.loads((second_out / "compare.json").read_text())["jobs"]["from_store"]

    own_passes = sum(json.loads(p.read_text())["seconds"]["passes"]
                     for p in (first_out / "runs").glob("*/summary.json"))
    # Where compare's time went, per job, from the store's records: passes, reports, and the rest (building the
    # model, the store); what no job accounts for is the process's own (imports, the table, its plots).
    records = [json.loads(p.read_text())["seconds"] for p in (store / "jobs").glob("*/job.json")]
    jobs_wall = sum(r["job"] for r in records)
    reports = sum(r.get("reports", 0.0) for r in records)
    setup = sum(r["job"] - r.get("passes", 0.0) - r.get("reports", 0.0) for r in records)
    count = len(models)
    overhead = (first - passes) / count
    name = f"dissect compare ({executor}" + (f", {shards} shards)" if executor == "ray" else ")")
    print(f"{name + ':':<34}{first:.1f} s -> {overhead:.2f} s per model beyond the single runs' passes "
          f"(goal < 1 s); {loop / first:.2f}x faster than the loop")
    print(f"{'':<34}its own passes {own_passes:.1f} s -> {(first - own_passes) / count:.2f} s per model beyond "
          "them (reports, set-up, imports)")
    print(f"{'':<34}per model: reports {reports / count:.2f} s, building the model and storing the run "
          f"{setup / count:.2f} s; once: {first - jobs_wall:.1f} s (imports, table)")
    print(f"{'again (store):':<34}{second:.2f} s for {cached}/{count} jobs from the store (goal < 5 s)")
    return {
        "compare_wall_s": round(first, 1), "compare_overhead_per_model_s": round(overhead, 2),
        "compare_own_passes_s": round(own_passes, 1),
        "compare_overhead_beyond_own_passes_per_model_s": round((first - own_passes) / count, 2),
        "compare_speedup_over_single_processes": round(loop / first, 2),
        "compare_reports_per_model_s": round(reports / count, 2),
        "compare_model_setup_and_store_per_model_s": round(setup / count, 2),
        "compare_process_fixed_s": round(first - jobs_wall, 1),
        "compare_from_store_wall_s": round(second, 2), "jobs_from_store": cached, "rows": len(rows),
    }


if __name__ == "__main__":
    main()
