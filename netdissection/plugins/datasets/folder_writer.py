"""Write any concept dataset in the ``folder`` format (concepts.csv, samples.csv, images/, masks/)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...core.errors import DissectionError
from .broden_writer import Progress, staging, stems, write_csv, write_image
from .folder_dataset import CONCEPTS, SAMPLES
from .labelmaps import MAX_ID, encode_gray

if TYPE_CHECKING:
    from ...core.protocols import ConceptDataset
    from ...core.types import Vocabulary

log = logging.getLogger(__name__)


def concept_rows(vocabulary: Vocabulary) -> list[list[object]]:
    """``id,name,category`` rows, grouped by category in vocabulary order: the folder format takes its
    category order from first appearance, so this keeps the report columns in the same order."""
    order = {c: i for i, c in enumerate(vocabulary.categories)}
    concepts = sorted(vocabulary.concepts, key=lambda c: (order[c.category], c.number))
    empty = [c for c in vocabulary.categories if c not in {k.category for k in concepts}]
    if empty:
        log.warning("categories without concepts are left out: %s", ", ".join(empty))
    return [[c.number, c.name, c.category] for c in concepts]


def write_folder(dataset: ConceptDataset, dest: str | Path, *, progress: Progress | None = None) -> Path:
    """Write ``dataset`` as a folder-format concept set at ``dest`` (which must not exist yet).

    Label maps are grayscale PNGs (8-bit when every id fits, else 16-bit), one per label layer; layers with
    no label are left out (they change no count). The label resolution of every sample must be the same.
    """
    vocab = dataset.vocabulary
    max_id = vocab.size - 1
    if max_id > MAX_ID:
        raise DissectionError(f"concept ids above {MAX_ID} do not fit 16-bit label maps")
    dest = Path(dest).expanduser()
    with staging(dest) as root:
        (root / "images").mkdir()
        (root / "masks").mkdir()
        rows: list[list[str]] = []
        label_size: tuple[int, int] | None = None
        for index, stem in enumerate(stems(len(dataset))):
            sample = dataset.load(index, image=False, labels=True)
            assert sample.layers is not None
            if label_size is None:
                label_size = sample.label_shape
            elif sample.label_shape != label_size:
                raise DissectionError(f"sample {index} has labels at {sample.label_shape} but the first at "
                                      f"{label_size}; the folder format has one label resolution per set")
            name, size = write_image(dataset, index, root / "images", stem)
            masks = []
            for k, layer in enumerate(sample.layers):
                if layer.any():
                    masks.append(f"masks/{stem}_{k + 1}.png")
                    (root / masks[-1]).write_bytes(encode_gray(layer, max_id))
            if index == 0 and not masks and label_size != size:
                # The reader takes the label resolution from the first label map: pin it with an empty one.
                masks.append(f"masks/{stem}_0.png")
                (root / masks[-1]).write_bytes(encode_gray(np.zeros(label_size, np.int64), max_id))
            rows.append([f"images/{name}", ";".join(masks), ";".join(map(str, sample.image_labels))])
            if progress is not None:
                progress(index + 1)
        write_csv(root / CONCEPTS, ("id", "name", "category"), concept_rows(vocab))
        write_csv(root / SAMPLES, ("image", "masks", "labels"), rows)
    log.info("wrote %d images as a folder dataset at %s", len(rows), dest)
    return dest
