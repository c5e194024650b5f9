"""The `dissect` command leaves its process as the interpreter would, minus the teardown: the same exit status,
every exit handler run, other threads finished, output flushed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LEAVE = """
import atexit, sys, threading, time
from pathlib import Path
from netdissection.cli import _leave

def late():
    time.sleep(0.3)
    Path(sys.argv[1]).write_text("finished")

threading.Thread(target=late).start()  # not a daemon: the interpreter would wait for it
atexit.register(lambda: print("handler ran", end=""))
print("buffered output, ", end="")  # still in the buffer (stdout is a pipe)
code = {code}
_leave(code)
print("never")
"""


@pytest.mark.parametrize(("code", "status", "stderr"), [("None", 0, ""), ("0", 0, ""), ("2", 2, ""),
                                                        ("'a message'", 1, "a message")])
def test_leave_is_the_interpreters_exit_without_its_teardown(tmp_path: Path, code: str, status: int,
                                                             stderr: str) -> None:
    flag = tmp_path / "thread"
    proc = subprocess.run([sys.executable, "-c", LEAVE.format(code=code), str(flag)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == status
    assert proc.stdout == "buffered output, handler ran"
    assert proc.stderr.strip() == stderr
    assert flag.read_text() == "finished"


def test_the_command_exits_with_its_status_and_whole_output(tmp_path: Path) -> None:
    """The console script's own way out: a listing piped in full, a bad input's status 2 and one-line error."""
    listing = subprocess.run([sys.executable, "-m", "netdissection.cli", "plugins"], capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0 and "quantile" in listing.stdout and "html" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "netdissection.cli", "report", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: results folder {tmp_path / 'nowhere'} does not exist; pass "
                                               "the --out folder of a finished dissection"]
