"""A process out of file descriptors (``ulimit -n``): one line naming the limit and the fix.

Each batch a loader worker hands over travels as a file descriptor until the main process has it, and the
workers, the activation cache and the report's files take their own; under a very low limit one of them is
refused with ``EMFILE`` (torch words it as a ``RuntimeError`` of its own).
"""

from __future__ import annotations

import errno

from .errors import DissectionError

try:  # now, while a file can still be opened: the module may have to be read from disk
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

#: What raising the limit takes, in the message.
RAISE_IT = "raise the limit (ulimit -n 4096)"


def is_out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` says the process (``EMFILE``) or the system (``ENFILE``) has no file descriptor left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    return isinstance(exc, RuntimeError) and "Too many open files" in str(exc)


def open_files_limit() -> str:
    """The process's limit on open files as a number, "unlimited", or "few" where it cannot be read."""
    if resource is None:
        return "few"
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def out_of_descriptors(what: str, fix: str = RAISE_IT) -> DissectionError:
    """The one-line error: ``what`` ran out of file descriptors, the limit, and ``fix``."""
    return DissectionError(f"{what} ran out of file descriptors (this process may have {open_files_limit()} "
                           f"open files): {fix}")
