"""How long the reports of a 512-unit layer with 10 images per unit take, and how heavy the page is.

    python benchmarks/report.py [--images 100] [--size 224] [--units 512] [--top-k 10]

Builds a synthetic run (made-up counts, random top images over a generated concept set: no model runs)
and times each report writer on it. Prints the timings and the sizes; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `tests` is a package here

from netdissection.registry import build_host
from tests.report_data import generated_set, synthetic_run


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images in the generated concept set")
    parser.add_argument("--size", type=int, default=224, help="image size of the generated set")
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    host = build_host()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        dataset = generated_set(root / "set", args.images, args.size)
        print(f"generated {args.images} images of {args.size}² in {time.perf_counter() - started:.1f} s")
        result = synthetic_run(dataset, units=args.units, k=args.top_k)
        for name in ("html", "plots"):
            out = root / name
            out.mkdir()
            writer = host.catalog("reporter").get(name).factory()
            started, cpu = time.perf_counter(), time.process_time()
            written = writer.write(result, out)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            files, size = folder_size(out)
            print(f"{name:6s} {seconds:6.2f} s ({cpu:5.2f} s CPU)  {files:5d} files  {size / 1e6:6.2f} MB  "
                  f"({', '.join(p.name for p in written[:4])}{', ...' if len(written) > 4 else ''})")
            if name == "html":
                page = out / "report.html"
                print(f"       report.html {page.stat().st_size / 1e3:.0f} kB; "
                      f"{args.units} units × {args.top_k} images of {args.size}²")


if __name__ == "__main__":
    main()
