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


# A tuned process frees 200 MB of small blocks (the heap keeps them, within its trim threshold); prints its
# resident anonymous memory then, and after batches_done().
GIVE_BACK = """
from netdissection.core import malloc
def anon():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) >> 10
assert malloc.tune_for_batches()
blocks = [bytearray(b"x" * 100_000) for _ in range(2_000)]
del blocks
held = anon()
assert malloc.batches_done()
print(held, anon())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc.user_tuned(), reason="glibc's allocator only")
def test_after_the_batches_a_tuned_process_gives_its_free_pages_back() -> None:
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    held, after = map(int, out.stdout.split())
    assert held - after >= 150, (held, after)  # MB


def test_an_untuned_process_is_left_as_it_is() -> None:
    # The library's callers own their processes: only the command that tuned its allocator trims it.
    out = subprocess.run([sys.executable, "-c", "from netdissection.core import malloc; print(malloc.batches_done())"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
