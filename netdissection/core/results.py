"""Saving and loading run results: the counts behind every score, so reports can be rebuilt later."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DissectionError
from .explain import EXPLANATIONS, read_explanations
from .files import atomic_write, atomic_write_text
from .skipped import skipped_from_json
from .types import Concept, LayerResult, RunResult, TopImages, Vocabulary

SUMMARY = "summary.json"
COUNTS = "counts.npz"


def vocabulary_to_json(vocab: Vocabulary) -> dict[str, Any]:
    return {"categories": list(vocab.categories),
            "concepts": [[c.number, c.name, c.category, list(c.categories)] for c in vocab.concepts]}


def vocabulary_from_json(data: dict[str, Any]) -> Vocabulary:
    return Vocabulary(tuple(data["categories"]),
                      tuple(Concept(int(n), name, cat, tuple(cats)) for n, name, cat, cats in data["concepts"]))


def save_counts(result: LayerResult, path: Path) -> Path:
    arrays = {"thresholds": result.thresholds, "intersection": result.intersection, "truth": result.truth,
              "activation": result.activation}
    if result.top_images is not None:
        arrays.update(top_indices=result.top_images.indices, top_scores=result.top_images.scores,
                      top_maps=result.top_images.maps)
    if result.bootstrap is not None:
        arrays.update(result.bootstrap.arrays())

    def write(f: Any) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        f.write(buffer.getvalue())

    return atomic_write(path, write)


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(summary, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_run(out_dir: str | Path) -> RunResult:
    """Load a finished run from its folder (``summary.json`` and each layer's ``counts.npz``)."""
    from .bootstrap import LayerBootstrap

    root = Path(out_dir)
    summary_path = root / SUMMARY
    if not summary_path.is_file():
        raise DissectionError(f"{root} holds no finished run: {SUMMARY} is missing")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        vocab = vocabulary_from_json(summary["vocabulary"])
        layers: dict[str, LayerResult] = {}
        for entry in summary["layers"]:
            with np.load(root / entry["folder"] / COUNTS) as data:
                top = None
                if "top_indices" in data:
                    top = TopImages(data["top_indices"], data["top_scores"], data["top_maps"])
                bootstrap = LayerBootstrap.load(entry["bootstrap"], data) if entry.get("bootstrap") else None
                layers[entry["layer"]] = LayerResult(
                    layer=entry["layer"], vocabulary=vocab, thresholds=data["thresholds"],
                    intersection=data["intersection"], truth=data["truth"], activation=data["activation"],
                    top_images=top, seconds=entry.get("seconds", {}), module=entry.get("module"),
                    map_shape=tuple(entry["map"]) if entry.get("map") else None,
                    warnings=list(entry.get("warnings", [])), bootstrap=bootstrap)
            explained = root / entry["folder"] / EXPLANATIONS
            if explained.is_file():
                layers[entry["layer"]].explanations = read_explanations(explained)
    except (OSError, KeyError, ValueError) as exc:
        raise DissectionError(f"{root} holds an unreadable run ({exc}); run the dissection again") from None
    return RunResult(layers=layers, provenance=summary["provenance"], seconds=summary.get("seconds", {}),
                     images=int(summary.get("images", 0)), plugin_errors=list(summary.get("plugin_errors", [])),
                     skipped=skipped_from_json(summary.get("skipped")))
