"""The protocol's counts written out plainly, image by image and unit by unit: the reference a threshold
rule's (or a dataset's) results are checked against. It shares no code with the package's passes.

Paper semantics: ``I[u, l] = Σ_x |M_u(x) ∩ L_l(x)|``, ``G[l] = Σ_x |L_l(x)|``,
``A[u, c] = Σ over images that have category c of |M_u(x)|``, with ``M_u(x) = S_u(x) > T_u`` and
``S_u(x)`` the map upsampled bilinearly (half-pixel centres, clamped edges) to the label size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..core.protocols import Backend, ConceptDataset


@dataclass(frozen=True)
class ReferenceCounts:
    """``intersection`` (U, L), ``truth`` (L,), ``activation`` (U, C), indexed like a ``LayerResult``'s."""

    intersection: np.ndarray
    truth: np.ndarray
    activation: np.ndarray


def reference_maps(backend: Backend, dataset: ConceptDataset, layer: str, *, batch_size: int = 32) -> np.ndarray:
    """The raw maps ``(N, units, h, w)`` of ``layer`` for every image of ``dataset``, normalised by the
    backend's ``input_spec()`` in plain numpy (float32, as a run does) and fed ``batch_size`` at a time
    (the same batches as a run with that batch size give bit-identical maps)."""
    import torch

    spec = backend.input_spec()
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 1, 3)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 1, 3)
    maps = []
    for start in range(0, len(dataset), batch_size):
        images = []
        for index in range(start, min(start + batch_size, len(dataset))):
            image = dataset.load(index, image=True, labels=False).image
            assert image is not None
            x = (image.astype(np.float32) / np.float32(255) - mean) / std
            if spec.channel_order.upper() == "BGR":
                x = x[..., ::-1]
            images.append(x.transpose(2, 0, 1))
        with torch.inference_mode():
            out = backend.activations(torch.from_numpy(np.ascontiguousarray(np.stack(images))), [layer])
        maps.append(np.asarray(torch.as_tensor(out[layer]).float().cpu().numpy()))
    return np.concatenate(maps)


def upsample(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear upsampling with half-pixel centres and clamped edges, in float64, from its definition."""
    h, w = a.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(source.astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        weight = np.where(high != low, source - low, 0.0)
        return low, high, weight

    y0, y1, wy = axis(out_h, h)
    x0, x1, wx = axis(out_w, w)
    a = a.astype(np.float64)
    top = (1 - wx) * a[y0][:, x0] + wx * a[y0][:, x1]
    bottom = (1 - wx) * a[y1][:, x0] + wx * a[y1][:, x1]
    return (1 - wy)[:, None] * top + wy[:, None] * bottom


def reference_counts(maps: np.ndarray, dataset: ConceptDataset, thresholds: np.ndarray) -> ReferenceCounts:
    """I, G and A of the paper's protocol for ``maps`` ``(N, U, h, w)`` (one per sample of ``dataset``, in
    order) and one threshold per unit."""
    vocab = dataset.vocabulary
    units = maps.shape[1]
    category = {c.number: vocab.categories.index(c.category) for c in vocab.concepts}
    intersection = np.zeros((units, vocab.size), dtype=np.int64)
    truth = np.zeros(vocab.size, dtype=np.int64)
    activation = np.zeros((units, len(vocab.categories)), dtype=np.int64)
    for x in range(len(dataset)):
        sample = dataset.load(x, image=False, labels=True)
        sh, sw = sample.label_shape
        where: dict[int, np.ndarray] = {}
        for layer in sample.layers if sample.layers is not None else ():
            for label in np.unique(layer):
                if label:
                    where[int(label)] = where.get(int(label), np.zeros((sh, sw), bool)) | (layer == label)
        for label in sample.image_labels:
            if label:
                where[int(label)] = np.ones((sh, sw), bool)
        for label, pixels in where.items():
            truth[label] += int(pixels.sum())
        has = sorted({category[label] for label in where})
        for u in range(units):
            mask = upsample(maps[x, u], sh, sw) > thresholds[u]
            for label, pixels in where.items():
                intersection[u, label] += int((mask & pixels).sum())
            for c in has:
                activation[u, c] += int(mask.sum())
    return ReferenceCounts(intersection, truth, activation)
