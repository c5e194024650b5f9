"""Each unit's top-k images by maximum activation, kept during the activation pass."""

from __future__ import annotations

import numpy as np
import torch

from .types import TopImages


class TopImagesTracker:
    """Running top-k over (image, unit) peaks, with the raw maps the report draws masks from."""

    def __init__(self, units: int, k: int) -> None:
        self.units, self.k = units, k
        self.scores = torch.full((units, 0), -torch.inf)
        self.indices = torch.zeros((units, 0), dtype=torch.int64)
        self.maps: torch.Tensor | None = None

    def update(self, activations: torch.Tensor, indices: np.ndarray) -> None:
        acts = activations.detach().float().cpu()
        n = acts.shape[0]
        peaks = acts.amax(dim=(2, 3)).T  # (U, N)
        candidates = torch.cat([self.scores, peaks], dim=1)
        ids = torch.cat([self.indices, torch.from_numpy(indices).expand(self.units, n)], dim=1)
        per_unit = acts.transpose(0, 1)  # (U, N, h, w)
        maps = per_unit if self.maps is None else torch.cat([self.maps, per_unit], dim=1)
        keep = min(self.k, candidates.shape[1])
        # Stable order: among equal peaks the earlier image stays first.
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :keep]
        self.scores = torch.gather(candidates, 1, order)
        self.indices = torch.gather(ids, 1, order)
        h, w = maps.shape[2:]
        self.maps = torch.gather(maps, 1, order[:, :, None, None].expand(-1, -1, h, w)).clone()

    def result(self) -> TopImages:
        assert self.maps is not None
        return TopImages(self.indices.numpy().copy(), self.scores.double().numpy().copy(), self.maps.numpy().copy())
