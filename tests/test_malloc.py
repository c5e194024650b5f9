"""The ``dissect`` command's allocator setting: each batch reuses the pages of the one before."""

from __future__ import annotations

import subprocess
import sys

import pytest

from netdissection.core import malloc

# A "batch": blocks of 2.4 to 24 MB allocated, written and freed, five times; prints the page faults of the
# last four batches.
REUSE = """
import resource, sys
from netdissection.core import malloc
if sys.argv[1] == "tuned":
    assert malloc.tune_for_batches()
import numpy as np
def batch():
    blocks = [np.ones(n) for n in (300_000, 700_000, 1_500_000, 3_000_000)]
    return sum(block.sum() for block in blocks)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", REUSE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc.user_tuned(), reason="glibc's allocator only")
def test_a_tuned_process_reuses_a_batch_sized_block() -> None:
    # By default each block is mapped afresh and its pages faulted in again (fewer where the kernel gives
    # huge pages); tuned, the heap keeps the pages of one batch for the next.
    assert faults("tuned") <= min(100, faults("default") // 10)


@pytest.mark.parametrize(("environ", "tuned"), [
    ({}, False),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, False),  # not a tunable glibc reads (those end in an underscore)
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
])
def test_the_users_own_setting_stands(environ: dict[str, str], tuned: bool) -> None:
    assert malloc.user_tuned(environ) is tuned
