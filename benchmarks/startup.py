"""How fast the commands that run no model answer, and whether they import a framework.

    python benchmarks/startup.py [--runs 5]

Times ``dissect --help``, ``dissect plugins``, ``dissect backends`` and ``dissect report DIR`` (the reports of
a small finished run rebuilt: tally only, then every default report) as whole processes, median of
``--runs``, and lists the heavy modules each one imports, from ``python -X importtime`` (cumulative import
milliseconds, measured on its own run). None of them should import torch.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "timm", "onnxruntime", "onnx", "datasets", "pyarrow", "ray", "pandas",
         "matplotlib", "matplotlib.figure", "PIL", "PIL.Image", "numpy", "rich", "click", "pluggy")
CLI = [sys.executable, "-m", "netdissection.cli"]  # what the `dissect` script runs


def small_run(root: Path) -> Path:
    """A finished run to rebuild reports of: resnet18 layer4 on 12 generated 64 px images."""
    from netdissection.plugins.datasets.generated import generate_concept_set

    data = generate_concept_set(root / "set", images=12, image_size=64, seed=0)
    out = root / "run"
    subprocess.run([*CLI, "run", "resnet18", "--dataset", str(data), "--layer", "layer4", "--out", str(out),
                    "--workers", "0"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def imports(args: list[str]) -> dict[str, float]:
    """Top-level heavy modules the command imports, with their cumulative import milliseconds."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "netdissection.cli", *args],
                          capture_output=True, text=True, check=False)
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| *(\S+)$", line)  # any depth of import
        if match and match.group(2) in HEAVY:
            found[match.group(2)] = int(match.group(1)) / 1e3
    return found


def seconds(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = small_run(Path(tmp))
        commands = {
            "dissect --help": ["--help"],
            "dissect plugins": ["plugins"],
            "dissect backends": ["backends"],
            "dissect report DIR --report tally": ["report", str(run), "--report", "tally"],
            "dissect report DIR (every default report)": ["report", str(run)],
        }
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; median of {args.runs} runs")
        print(f"{'command':44s} {'seconds':>22s}  torch?  heavy imports (cumulative ms)")
        for label, argv in commands.items():
            times = seconds(argv, args.runs)
            found = imports(argv)
            heavy = ", ".join(f"{name} {ms:.0f}" for name, ms in sorted(found.items(), key=lambda kv: -kv[1]))
            spread = f"{statistics.median(times):.2f} ({min(times):.2f}–{max(times):.2f})"
            print(f"{label:44s} {spread:>22s}  {'yes' if 'torch' in found else 'no':6s}  {heavy}")
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
