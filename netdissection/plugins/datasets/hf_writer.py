"""Write any concept dataset as a HuggingFace ``save_to_disk`` folder that ``--dataset hf:PATH`` reads back.

Columns: ``image`` (the original encoded image), ``masks`` (a list of grayscale label PNGs, one per label
layer) and ``labels`` (a list of image-level concept ids), with the folder format's ``concepts.csv`` saved
beside the Arrow files, where the reader finds it without ``--concepts``.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import DissectionError
from .broden_writer import Progress, image_source, staging, write_csv
from .folder_dataset import CONCEPTS
from .folder_writer import concept_rows
from .labelmaps import MAX_ID, encode_gray, encode_png, read_size

if TYPE_CHECKING:
    from ...core.protocols import ConceptDataset

log = logging.getLogger(__name__)


def _rows(dataset: Any, progress: Progress | None = None) -> Iterator[dict[str, Any]]:
    """One record per sample; module level so that ``datasets`` can fingerprint the generator."""
    max_id = dataset.vocabulary.size - 1
    label_size = None
    for index in range(len(dataset)):
        source = image_source(dataset, index)
        sample = dataset.load(index, image=source is None, labels=True)  # decode only what has no file
        label_size = label_size or sample.label_shape
        if sample.label_shape != label_size:
            raise DissectionError(f"sample {index} has labels at {sample.label_shape} but the first at {label_size}; "
                                  "a HuggingFace concept set has one label resolution")
        image = source[0] if source is not None else encode_png(sample.image)
        layers = [layer for layer in sample.layers if layer.any()]
        if index == 0 and not layers and sample.label_shape != read_size(image, "image 0"):
            # The reader takes the label resolution from the first label map: pin it with an empty one.
            layers = [np.zeros(sample.label_shape, dtype=np.int64)]
        yield {"image": {"bytes": image, "path": None},
               "masks": [{"bytes": encode_gray(layer, max_id), "path": None} for layer in layers],
               "labels": list(sample.image_labels)}
        if progress is not None:
            progress(index + 1)


def write_hf(dataset: ConceptDataset, dest: str | Path, *, progress: Progress | None = None) -> Path:
    """Write ``dataset`` as a ``save_to_disk`` folder at ``dest`` (which must not exist yet)."""
    import datasets
    from datasets.utils import logging as hf_logging

    if dataset.vocabulary.size - 1 > MAX_ID:
        raise DissectionError(f"concept ids above {MAX_ID} do not fit 16-bit label maps")
    features = datasets.Features({
        "image": datasets.Image(),
        "masks": datasets.List(datasets.Image()),
        "labels": datasets.List(datasets.Value("int32")),
    })
    dest = Path(dest).expanduser()
    quiet = hf_logging.is_progress_bar_enabled()
    with staging(dest) as root:
        cache = root.parent / f".{root.name}.cache"
        try:
            if quiet:
                hf_logging.disable_progress_bar()
            # Records stream through an Arrow file on disk: the set is never held in memory as a whole. The
            # cache is private and removed, so a fixed fingerprint spares hashing the arguments.
            built = datasets.Dataset.from_generator(_rows, features=features, cache_dir=str(cache),
                                                    gen_kwargs={"dataset": dataset, "progress": progress},
                                                    fingerprint=f"netdissection-{uuid.uuid4().hex}")
            built.save_to_disk(str(root))
            del built
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
            shutil.rmtree(cache, ignore_errors=True)
        write_csv(root / CONCEPTS, ("id", "name", "category"), concept_rows(dataset.vocabulary))
    log.info("wrote %d images as a HuggingFace dataset at %s", len(dataset), dest)
    return dest
