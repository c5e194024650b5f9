"""Jobs and their keys: a hash of everything a dissection's numbers depend on.

A *job* is one dissection: a model with its weights, the layers, the concept dataset and the protocol.
Its *key* hashes the model reference (or a model file's SHA-256), the weights' SHA-256, the backend and
its options (and the versions of the frameworks it runs on), the layers as requested, a fingerprint of
the dataset, the threshold rule and its parameters, the semantics, a basis rotation (α, seed, method) where
there is one, and :data:`PROTOCOL_VERSION`.

Computing a key imports no framework and reads no image: a finished job is found in the results store
without starting torch. The dataset fingerprint hashes the bytes of the small index and label files
(CSV, JSON, text) and only the name, size and modification time of every other file (images, label PNGs,
Arrow shards): cheap for 60,000 images, and any edit, added or removed file changes it.

What is not in the key, because it does not change the numbers: batch size, data-loading workers, the
report writers, and how the job is shown (its display name, x value and labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import atomic_write_text

log = logging.getLogger(__name__)

#: Bump when a change of the protocol or of what a run writes makes stored results stale.
PROTOCOL_VERSION = 2  # 2: batch norms folded into their convolutions on torch (maps change in the last bits)
#: Hex digits of a key (128 bits).
KEY_LENGTH = 32
#: Files with these suffixes are hashed by content in a dataset fingerprint (index and label tables).
CONTENT_HASHED = frozenset({".csv", ".tsv", ".json", ".jsonl", ".txt", ".yaml", ".yml"})
#: ... when they are at most this large; larger ones count by name, size and modification time.
CONTENT_HASH_LIMIT = 64 << 20


@dataclass(frozen=True)
class Job:
    """One dissection: what it computes (all in the key) and how it runs and is shown (not in the key).

    ``layers`` are the names as requested (empty: the model's default layer); with ``lenient_layers`` a
    requested layer the model does not have is skipped instead of being an error (``dissect compare``
    applies ``--layer`` where it exists). ``dataset`` is a path or None for the built-in concept set.
    """

    model: str
    backend: str | None = None
    weights: str | None = None
    pretrained: bool = False
    layers: tuple[str, ...] = ()
    lenient_layers: bool = False
    dataset: str | None = None
    dataset_format: str | None = None
    categories: tuple[str, ...] | None = None
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    threshold: str | None = None  # the rule's name (None: the default, quantile)
    threshold_params: Mapping[str, Any] = field(default_factory=dict)
    quantile: float | None = None  # the quantile rule's q, as --quantile gives it
    compat: str = "paper"
    top_k: int = 10
    skip_bad: bool = False
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    #: ``--rotate``: the layers' units read in the basis Q^rotate, Q drawn from ``rotate_seed`` (None: as they are).
    rotate: float | None = None
    rotate_seed: int = 0
    bootstrap: int = 0  # resamples (0: none); in the key with its seed only when there are resamples
    bootstrap_seed: int = 0
    explain: str | None = None  # an explainer's name (--explain), its parameters and units (1-based)
    explain_params: Mapping[str, Any] = field(default_factory=dict)
    explain_units: tuple[int, ...] | None = None
    # How it runs: not in the key.
    batch_size: int = 32
    workers: int | None = None
    reporters: tuple[str, ...] | None = None
    plot_formats: tuple[str, ...] = ()  # PNG, PDF copies of the plots (--plot-format)
    cache: str = "auto"
    cache_budget: str | int | None = None
    # How it is shown: not in the key.
    name: str = ""
    x: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.name or self.model

    def to_json(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, mappings as dicts with string keys, paths as strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---- file digests --------------------------------------------------------------------------------------------

class DigestMemo:
    """SHA-256 of files, remembered by (path, size, modification time, inode) in a small JSON file, so that
    a rerun over large checkpoints does not read them again. Without a path it only memoises in memory."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self._entries = loaded
            except (OSError, ValueError):
                log.debug("ignoring an unreadable digest memo %s", path)

    def sha256(self, file: str | os.PathLike[str]) -> str:
        p = Path(file).expanduser().resolve()
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self._entries.get(str(p))
        if isinstance(known, list) and len(known) == 4 and known[:3] == stamp:
            return str(known[3])
        digest = file_sha256(p)
        self._entries[str(p)] = [*stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            atomic_write_text(self.path, json.dumps(self._entries, sort_keys=True))
            self._dirty = False
        except OSError as exc:  # a memo that cannot be saved only costs a rehash next time
            log.debug("cannot save the digest memo %s: %s", self.path, exc)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- dataset fingerprint ---------------------------------------------------------------------------------------

def dataset_fingerprint(root: str | os.PathLike[str], memo: DigestMemo | None = None) -> dict[str, Any]:
    """A cheap fingerprint of a dataset folder (or file): index and label tables by content, every other
    file by name, size and modification time. Hidden files (a writer's temporary files) are left out."""
    memo = memo or DigestMemo()
    base = Path(root).expanduser().resolve()
    digest = hashlib.sha256()
    files = total = 0
    for relative, path in _walk(base):
        st = path.stat()
        files += 1
        total += st.st_size
        if path.suffix.lower() in CONTENT_HASHED and st.st_size <= CONTENT_HASH_LIMIT:
            entry = f"{relative}\0sha256\0{memo.sha256(path)}\n"
        else:
            entry = f"{relative}\0{st.st_size}\0{st.st_mtime_ns}\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return {"sha256": digest.hexdigest(), "files": files, "bytes": total}


def _walk(base: Path) -> list[tuple[str, Path]]:
    if base.is_file():
        return [(base.name, base)]
    found: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(folder) / name
                found.append((path.relative_to(base).as_posix(), path))
    return found


def local_dataset_path(dataset: str) -> Path | None:
    """The local file or folder a ``--dataset`` value names (``hf:FOLDER`` included), or None for a
    reference that is not on this machine (a hub name): such jobs are not stored."""
    for candidate in (dataset, dataset.split(":", 1)[1] if ":" in dataset[2:] else None):
        if candidate and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser().resolve()
    return None


# ---- the key -------------------------------------------------------------------------------------------------

class NotStorable(Exception):
    """The job cannot be keyed (its dataset is not on this machine): it runs without the store."""


def key_material(job: Job, host: Any, rule: Mapping[str, Any], memo: DigestMemo | None = None, *,
                 builtin_root: Path | None = None) -> dict[str, Any]:
    """Everything the job's numbers depend on, as plain JSON (what the key hashes; stored beside the run).

    ``rule``: the threshold rule as the run records it (``{"name", "params"}``, defaults included, so that
    ``--quantile 0.005`` and no option share a key). ``builtin_root``: the built-in concept set's folder when
    the caller already has it (else its factory is asked). Raises :class:`NotStorable` for a dataset that is
    not on this machine."""
    memo = memo or DigestMemo()
    material = {
        "protocol": PROTOCOL_VERSION,
        "model": _model_identity(job.model, memo),
        "backend": _backend_identity(host, job.backend, job.backend_options.get("runtime")),
        "weights_sha256": memo.sha256(job.weights) if job.weights else None,
        "pretrained": bool(job.pretrained and not job.weights),
        "backend_options": _plain(dict(sorted(job.backend_options.items()))),
        "device": job.device.split(":", 1)[0],  # numbers may differ between devices, not between GPUs
        # Not lenient_layers: where every requested layer exists a lenient run is the strict run, so
        # `dissect MODEL` finds what `dissect compare` computed (ExecutionContext.stored checks the layers).
        "layers": list(job.layers),
        "dataset": _dataset_identity(host, job, memo, builtin_root),
        "threshold_rule": _plain({"name": rule["name"], "params": dict(sorted(rule["params"].items()))}),
        "semantics": job.compat,
        "top_k": int(job.top_k),
        "skip_bad": bool(job.skip_bad),
        # Only where a job rotates, so that the keys of every other job stay as they were.
        **({"rotation": _rotation_identity(job)} if job.rotate is not None else {}),
        # Only when given, so that the keys of runs without an explainer stay what they were.
        **({"explain": _explainer_identity(host, job)} if job.explain is not None else {}),
    }
    if job.bootstrap:  # without one a run is what it always was, and keeps its key
        from .bootstrap import BLOCKS

        material["bootstrap"] = {"resamples": int(job.bootstrap), "seed": int(job.bootstrap_seed), "blocks": BLOCKS}
    return material


def _rotation_identity(job: Job) -> dict[str, Any]:
    from .rotation import Rotation

    return Rotation(float(job.rotate or 0.0), int(job.rotate_seed)).key()


def key_of(material: Mapping[str, Any]) -> str:
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:KEY_LENGTH]


def _model_identity(model: str, memo: DigestMemo) -> dict[str, Any]:
    path = Path(model).expanduser()
    if not path.is_file():
        return {"name": model}
    # A model file counts by its bytes, not its path; so do files beside it that carry its data
    # (an ONNX model's external weights, model.onnx.data).
    extra = {p.name[len(path.name):]: memo.sha256(p) for p in sorted(path.parent.glob(f"{path.name}.*"))
             if p.is_file()}
    return {"file_sha256": memo.sha256(path), "suffix": path.suffix.lower(), "data_files": extra}


def _package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _backend_identity(host: Any, backend: str | None, runtime: str | None = None) -> dict[str, Any]:
    """The backend asked for (None: detected) and what decides its numbers: the versions of the frameworks
    it needs (onnxruntime's too when ``--runtime`` may run the model there), and of third-party plugins that
    provide it or take part in detecting it. Built-in plugins are covered by :data:`PROTOCOL_VERSION`, so a
    release that changes no number keeps the store valid."""
    catalog = host.catalog("backend")
    entries = [catalog.get(backend)] if backend is not None else list(catalog)
    packages = sorted({p for e in entries for p in e.metadata.get("requires", ())}
                      | ({"onnxruntime"} if runtime in ("onnxruntime", "auto") else set()))
    plugins = {e.plugin for e in entries}
    if backend is None:
        plugins |= {impl.plugin_name for impl in host.hook.dissect_detect_backend.get_hookimpls()}
    third_party = {r.name: r.version for r in host.plugins if r.name in plugins and r.source != "builtin"}
    return {"requested": backend, "frameworks": {p: _package_version(p) for p in packages},
            "plugins": dict(sorted(third_party.items()))}


def _explainer_identity(host: Any, job: Job) -> dict[str, Any]:
    """The explainer, its parameters as it runs with them (defaults included) and the units; a third-party
    plugin's version too (built-in explainers are covered by the protocol version)."""
    from .explain import explainer_params

    assert job.explain is not None
    entry = host.catalog("explainer").get(job.explain)
    _, params = explainer_params(job.explain, entry.factory, job.explain_params, compat=job.compat)
    record = next((r for r in host.plugins if r.name == entry.plugin), None)
    version = record.version if record is not None and record.source != "builtin" else None
    return {"name": job.explain, "params": _plain(dict(sorted(params.items()))),
            "units": list(job.explain_units) if job.explain_units is not None else None, "plugin_version": version}


def _dataset_identity(host: Any, job: Job, memo: DigestMemo, builtin_root: Path | None) -> dict[str, Any]:
    if job.dataset is None:
        entry = host.catalog("dataset").get("builtin")
        identity = entry.metadata.get("identity")
        if builtin_root is None and identity is not None:
            # What the generated set is made from: known without generating it, so a job is keyed (and a
            # wrong model reported) before the set is written the first time.
            return {"format": "builtin", "fingerprint": _plain(identity()),
                    "categories": sorted(job.categories) if job.categories else None,
                    "options": _plain(dict(sorted((k, v) for k, v in job.dataset_options.items() if v is not None)))}
        if builtin_root is None:
            # Its factory finds (or generates, once) the folder; no framework is imported.
            builtin_root = Path(entry.factory(None).describe()["path"])
        path, fmt = builtin_root, "builtin"
    else:
        local = local_dataset_path(str(job.dataset))
        if local is None:
            raise NotStorable(f"the dataset {job.dataset} is not a local file or folder")
        path, fmt = local, job.dataset_format
    options: dict[str, Any] = {}
    for name, value in sorted(job.dataset_options.items()):
        if value is None:
            continue
        if name == "concepts":  # a file naming the label ids: by content
            value = {"sha256": memo.sha256(value)}
        options[name] = _plain(value)
    return {"format": fmt, "fingerprint": dataset_fingerprint(path, memo),
            "categories": sorted(job.categories) if job.categories else None, "options": options}


def describe_material(material: Mapping[str, Any]) -> str:
    """A short human description of a key's material (for ``dissect cache ls``)."""
    model = material.get("model", {})
    name = model.get("name") or f"file {str(model.get('file_sha256', ''))[:12]}"
    layers: Sequence[str] = material.get("layers") or ["(default)"]
    return f"{name} [{', '.join(layers)}]"
