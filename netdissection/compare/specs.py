"""What to compare, from what the user typed: model names and globs, a models file, checkpoint series.

- ``resnet18``, ``model.onnx``: one model each. ``timm:convnext_tiny`` picks the backend by name.
- ``timm:convnext_*``, ``'vit_*_patch16_224'``: every name a backend lists (timm's ``list_models()``,
  torchvision's models) that matches the pattern (fnmatch, as ``timm.list_models`` matches); without a
  ``BACKEND:`` prefix, every backend that lists names is searched. ``models/*.onnx``: the files that match.
- ``--exclude PATTERN`` drops matches by name (with or without the ``BACKEND:`` prefix).
- A models file: one ``MODEL [--weights FILE] [--layer L]... [--label KEY=VALUE]... [--backend B]
  [--name NAME] [--checkpoints GLOBS]`` per line, ``#`` comments; relative paths are relative to the file's
  folder. A line with ``--checkpoints`` is a checkpoint series of its own, its labels naming its group.
- A checkpoint series: ``--checkpoints 'ckpt/epoch_*.pt'`` (comma-separated globs) of one architecture,
  each checkpoint's x value the one number in its file name (or ``--x-from REGEX``); the word ``random``
  adds the seeded untrained model as the baseline. Several series of the one architecture (two training
  settings): ``--checkpoints`` once per series, each followed by its own ``--label KEY=VALUE``
  (:class:`CheckpointSeries` from Python).
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import DissectionError

GLOB_CHARS = frozenset("*?[")
RANDOM = "random"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison, before the options common to all are added."""

    model: str
    backend: str | None = None
    weights: str | None = None
    layers: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    x: float | None = None
    #: A models file line's own checkpoint series (globs and ``random``), expanded by ``with_series``.
    checkpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointSeries:
    """One training run's checkpoints (globs, and ``random`` for the untrained baseline) and the labels that
    name its group in the plots (``{"dropout": "0.5"}``)."""

    checkpoints: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)


def is_glob(text: str) -> bool:
    return any(c in text for c in GLOB_CHARS)


def parse_label(text: str, where: str = "--label") -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise DissectionError(f"{where} {text!r} is not KEY=VALUE (e.g. --label dropout=0.5)")
    return key.strip(), value.strip()


def split_backend(ref: str, backends: Iterable[str]) -> tuple[str | None, str]:
    """``timm:convnext_*`` → ("timm", "convnext_*"); a prefix that names no backend stays part of the
    reference (``hf-hub:...``, a Windows drive letter)."""
    prefix, sep, rest = ref.partition(":")
    if sep and prefix in set(backends) and rest:
        return prefix, rest
    return None, ref


def expand(specs: Sequence[ModelSpec], host: Any, exclude: Sequence[str] = ()) -> list[ModelSpec]:
    """Globs expanded (to files, else to model names), ``exclude`` applied, duplicates dropped."""
    catalog = host.catalog("backend")
    out: list[ModelSpec] = []
    for spec in specs:
        backend, ref = split_backend(spec.model, catalog.names())
        backend = spec.backend or backend
        if not is_glob(ref):
            out.append(replace(spec, model=ref, backend=backend))
            continue
        files = sorted(glob.glob(str(Path(ref).expanduser())))
        if files:
            out.extend(replace(spec, model=f, backend=backend) for f in files)
            continue
        for name, owner in match_names(host, backend, ref):
            out.append(replace(spec, model=name, backend=owner))
    kept, seen = [], set()
    for spec in out:
        names = [spec.model] + ([f"{spec.backend}:{spec.model}"] if spec.backend else [])
        if any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in exclude):
            continue
        ident = (spec.model, spec.backend, spec.weights, spec.layers, tuple(sorted(spec.labels.items())), spec.x,
                 spec.checkpoints)
        if ident not in seen:
            seen.add(ident)
            kept.append(spec)
    if not kept and out:
        raise DissectionError(f"--exclude {', '.join(exclude)} leaves no model to compare")
    return kept


def match_names(host: Any, backend: str | None, pattern: str) -> list[tuple[str, str | None]]:
    """The model names backends list that match ``pattern``, each with the backend to use (None: the name
    is claimed by several, so detection picks as for ``dissect NAME``). Fails with close matches."""
    catalog = host.catalog("backend")
    entries = [catalog.get(backend)] if backend else [e for e in catalog if e.metadata.get("names")]
    listed: dict[str, list[str]] = {}
    for entry in entries:
        names = entry.metadata.get("names")
        if names is None:
            raise DissectionError(f"the {entry.name} backend takes no name patterns; name its models one by one")
        try:
            listed[entry.name] = list(names())
        except DissectionError:
            if backend:
                raise
            continue  # a backend whose framework is not installed
    owners: dict[str, list[str]] = {}
    for owner, names in listed.items():
        for name in fnmatch.filter(names, pattern):
            owners.setdefault(name, []).append(owner)
    if not owners:
        known = sorted({n for names in listed.values() for n in names})
        literal = "".join(c for c in pattern if c not in GLOB_CHARS and c not in "]")
        close = difflib.get_close_matches(literal, known, n=5, cutoff=0.6)
        what = f"{backend} model" if backend else "model"
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DissectionError(f"no {what} matches {pattern!r}{hint}")
    return [(name, owner[0] if backend or len(owner) == 1 else None) for name, owner in sorted(owners.items())]


def read_models_file(path: str | Path) -> list[ModelSpec]:
    """One model per line: ``MODEL [--weights FILE] [--layer L]... [--label K=V]... [--backend B] [--name N]
    [--checkpoints GLOBS]``."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DissectionError(f"cannot read the models file {file}: {exc}") from None
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{file}:{number}"
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise DissectionError(f"{where}: {exc}") from None
        if tokens:
            specs.append(_parse_line(tokens, where, file.parent))
    if not specs:
        raise DissectionError(f"the models file {file} names no model (one MODEL [--weights FILE] [--layer L] "
                              "per line)")
    return specs


def _parse_line(tokens: list[str], where: str, base: Path) -> ModelSpec:
    model, rest = tokens[0], tokens[1:]
    if model.startswith("-"):
        raise DissectionError(f"{where}: a line starts with the model, not {model!r}")
    values: dict[str, Any] = {"layers": [], "labels": {}}
    i = 0
    while i < len(rest):
        option, sep, value = rest[i].partition("=")
        if option not in ("--weights", "--layer", "--label", "--backend", "--name", "--checkpoints"):
            raise DissectionError(f"{where}: unknown option {rest[i]!r}; a line takes --weights FILE, --layer L, "
                                  "--label KEY=VALUE, --backend B, --name NAME, --checkpoints GLOBS")
        if not sep:
            if i + 1 >= len(rest):
                raise DissectionError(f"{where}: {option} needs a value")
            value = rest[i + 1]
            i += 1
        i += 1
        if option == "--layer":
            values["layers"].append(value)
        elif option == "--label":
            key, val = parse_label(value, f"{where}: --label")
            values["labels"][key] = val
        elif option == "--checkpoints":
            values.setdefault("checkpoints", []).extend(
                p if p.strip() == RANDOM else _relative(p.strip(), base, glob_pattern=True)
                for p in value.split(",") if p.strip())
        else:
            values[option[2:]] = value
    weights = values.get("weights")
    if weights and values.get("checkpoints"):
        raise DissectionError(f"{where}: --checkpoints gives the weights of each model of the series; drop --weights")
    return ModelSpec(model=_relative(model, base), backend=values.get("backend"),
                     weights=_relative(weights, base, must_exist=True, where=where) if weights else None,
                     layers=tuple(values["layers"]), labels=values["labels"], name=values.get("name", ""),
                     checkpoints=tuple(values.get("checkpoints", ())))


def _relative(path: str, base: Path, *, must_exist: bool = False, where: str = "", glob_pattern: bool = False) -> str:
    """A path of a models file, relative to the file's folder; a model name that is no file stays as it is."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidate = p
    elif (base / p).exists() or must_exist or glob_pattern or is_glob(path):
        candidate = base / p
    else:
        return path
    if must_exist and not candidate.is_file():
        raise DissectionError(f"{where}: weights file {candidate} does not exist")
    return str(candidate)


# ---- checkpoint series ---------------------------------------------------------------------------------------

def with_series(specs: Sequence[ModelSpec], checkpoints: Sequence[str] | Sequence[CheckpointSeries],
                x_from: str | None = None) -> list[ModelSpec]:
    """Checkpoint series expanded into one spec per checkpoint: a models file line's own ``--checkpoints``,
    and ``checkpoints`` (one series of globs, or several :class:`CheckpointSeries`) for the one model that has
    none of its own. The labels of a series tag each of its checkpoints and its random baseline."""
    series = as_series(checkpoints)
    plain = [s for s in specs if not s.checkpoints]
    if series and len(plain) != 1:
        raise DissectionError(f"--checkpoints is a series of one architecture; name exactly one model, "
                              f"not {len(plain)}")
    if x_from and not series and not any(s.checkpoints for s in specs):
        raise DissectionError("--x-from reads x values from checkpoint names; it needs --checkpoints")
    out: list[ModelSpec] = []
    for spec in specs:
        if spec.checkpoints:
            out += checkpoint_series(replace(spec, checkpoints=()), spec.checkpoints, x_from)
        elif series:
            for one in series:
                out += checkpoint_series(replace(spec, labels={**spec.labels, **one.labels}), one.checkpoints, x_from)
        else:
            out.append(spec)
    return out


def as_series(checkpoints: Sequence[str] | Sequence[CheckpointSeries]) -> list[CheckpointSeries]:
    """Globs (one series) or series, as series."""
    if not checkpoints:
        return []
    if all(isinstance(c, CheckpointSeries) for c in checkpoints):
        return [CheckpointSeries(tuple(c.checkpoints), dict(c.labels)) for c in checkpoints]  # type: ignore[union-attr]
    if any(isinstance(c, CheckpointSeries) for c in checkpoints):
        raise DissectionError("checkpoints: pass globs (one series) or CheckpointSeries, not both")
    return [CheckpointSeries(tuple(str(c) for c in checkpoints))]


def checkpoint_series(arch: ModelSpec, patterns: Sequence[str], x_from: str | None = None) -> list[ModelSpec]:
    """The checkpoints of one architecture, by x value; ``random`` adds the seeded untrained baseline."""
    if arch.weights:
        raise DissectionError("--checkpoints gives the weights of each model of the series; drop --weights")
    regex = _compile(x_from) if x_from else None
    items = [p.strip() for pattern in patterns for p in pattern.split(",") if p.strip()]
    series: list[ModelSpec] = []
    for item in items:
        if item == RANDOM:
            series.append(replace(arch, name=f"{arch.name or arch.model} (random)", x=None,
                                  labels={**arch.labels}))
            continue
        files = sorted(f for f in glob.glob(str(Path(item).expanduser())) if Path(f).is_file())
        if not files:
            raise DissectionError(f"--checkpoints {item!r} matches no file")
        for file in files:
            series.append(replace(arch, weights=file, x=checkpoint_x(file, regex),
                                  name=f"{arch.name or arch.model}@{Path(file).name}"))
    seen: dict[float, str] = {}
    for spec in series:
        if spec.x is None or spec.weights is None:
            continue
        if spec.x in seen and seen[spec.x] != spec.weights:
            raise DissectionError(f"checkpoints {seen[spec.x]} and {spec.weights} both have x = {_fmt(spec.x)}; "
                                  "pass --x-from REGEX to read another number from their names")
        seen[spec.x] = spec.weights
    unique = {(s.weights, s.x): s for s in series}
    return sorted(unique.values(), key=lambda s: (s.x is not None, s.x if s.x is not None else 0.0))


def checkpoint_x(file: str, regex: re.Pattern[str] | None = None) -> float:
    """The x value of a checkpoint: ``regex``'s first group (or match) in its file name, else the one
    number in its name without the suffix (``epoch_12.pt`` → 12)."""
    name = Path(file).name
    if regex is not None:
        match = regex.search(name)
        if match is None:
            raise DissectionError(f"--x-from {regex.pattern!r} does not match the checkpoint name {name}")
        text = match.group(1) if match.groups() else match.group(0)
        try:
            return float(text)
        except ValueError:
            raise DissectionError(f"--x-from {regex.pattern!r} finds {text!r} in {name}, not a number") from None
    numbers = _NUMBER.findall(Path(name).stem)
    if len(numbers) == 1:
        return float(numbers[0])
    found = f"several numbers ({', '.join(numbers)})" if numbers else "no number"
    raise DissectionError(f"the checkpoint name {name} holds {found}; pass --x-from REGEX to say which is its x "
                          "(e.g. --x-from 'epoch(\\d+)')")


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DissectionError(f"--x-from {pattern!r} is not a regular expression: {exc}") from None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)
