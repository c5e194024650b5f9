"""Checks shared by the CLI tests."""

from __future__ import annotations


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and one line on stderr, naming each needle, with no traceback (progress bars and one-line
    notices drawn before the error are allowed: the error is the one line that is neither)."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines()
             if line.strip() and "images/s" not in line and not line.startswith("INFO ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)
