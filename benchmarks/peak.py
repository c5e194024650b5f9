"""Run a Python program and record its own peak RSS when it exits (not its worker processes').

    python benchmarks/peak.py REPORT.json -m netdissection.cli resnet18 ...
    python benchmarks/peak.py REPORT.json path/to/script.py args ...

The program runs in this interpreter (``runpy``), as ``python -m MODULE`` or ``python SCRIPT`` would run it;
in its exit handlers, ``REPORT.json`` gets ``{"peak_mb": ..., "children_peak_mb": ...}``: the largest RSS of this
process, and of the largest child it waited for (loader workers, for instance). That is before the interpreter's
teardown, which a plain Python program then goes through (its destructors touch more of the libraries' pages)
and the ``dissect`` command skips; the calling process has the exit status.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import runpy
import sys


def main() -> None:
    report, target, *rest = sys.argv[1:]

    def record() -> None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with open(report, "w", encoding="utf-8") as f:
            json.dump({"peak_mb": own, "children_peak_mb": children}, f)

    atexit.register(record)
    # sys.path[0] as python itself sets it for the target, not this file's folder.
    if target == "-m":
        module, *rest = rest
        sys.argv, sys.path[0] = [module, *rest], os.getcwd()
        run = functools.partial(runpy.run_module, module, run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = [target, *rest], os.path.dirname(os.path.abspath(target))
        run = functools.partial(runpy.run_path, target, run_name="__main__")
    run()


if __name__ == "__main__":
    main()
