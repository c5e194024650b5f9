"""Writing results so that a run stopped half way leaves nothing that looks complete."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary sibling renamed into place only once it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


#: The temporary name of a file (or folder) being written: ``.<name>.tmp-<pid of the writing process>``.
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries_of_stopped_runs(folder: Path, depth: int = 3) -> list[Path]:
    """Delete what atomic writes of processes that no longer run left in ``folder`` (and its folders, to
    ``depth`` levels): a run killed while it wrote. Returns what was removed."""
    removed: list[Path] = []
    for root, dirs, files in os.walk(folder):
        level = len(Path(root).relative_to(folder).parts)
        for name in [*files, *dirs]:
            match = _TEMPORARY.match(name)
            if match is None or int(match.group(1)) == os.getpid() or process_alive(int(match.group(1))):
                continue
            path = Path(root) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if level + 1 < depth and (Path(root) / d).exists()
                   and not (Path(root) / d).is_symlink()]
    return removed


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def layer_dirnames(layers: Iterable[str] | Mapping[str, Any]) -> dict[str, str]:
    """A folder name per layer: characters unsafe in paths become ``_``; collisions get a suffix.

    Given the layers of a run (name → result), a layer is named after the module it resolved to
    (``stage:-1`` → ``stages.3``) where the result records one; results saved before that record none,
    so their folders keep the requested name and old runs reload as they were written.
    """
    names: dict[str, str] = {}
    used: set[str] = set()
    for layer in layers:
        module = getattr(layers[layer], "module", None) if isinstance(layers, Mapping) else None
        base = _UNSAFE.sub("_", module or layer).strip("._") or "layer"
        name, i = base, 2
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        names[layer] = name
    return names


def cache_root() -> Path:
    """The user's cache folder for netdissection: ``$NETDISSECTION_CACHE``, else
    ``$XDG_CACHE_HOME/netdissection``, else ``~/.cache/netdissection``."""
    if os.environ.get("NETDISSECTION_CACHE"):
        return Path(os.environ["NETDISSECTION_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "netdissection"
