"""Each unit's top-k images by maximum activation, kept during the activation pass; mergeable.

The order is total: by peak activation, descending, then by dataset index, ascending. So the k best
of a union are the same whatever order the images came in, and the top images of shards merge into
exactly the top images of one process reading the whole dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .types import TopImages

if TYPE_CHECKING:  # torch is imported where a partial is built or updated: reading results needs none
    import torch


@dataclass
class TopImagesPartial:
    """Per unit, the best images so far (at most ``k``), best first, with the raw maps the report
    draws masks from. Tensors on the CPU, so a partial pickles small and merges anywhere."""

    k: int
    scores: torch.Tensor  # (U, m) float32 peaks, m ≤ k
    indices: torch.Tensor  # (U, m) int64 dataset indices
    maps: torch.Tensor  # (U, m, h, w) float32 raw maps

    @classmethod
    def empty(cls, units: int, k: int, map_shape: tuple[int, int]) -> TopImagesPartial:
        import torch

        return cls(k, torch.empty(units, 0), torch.empty(units, 0, dtype=torch.int64),
                   torch.empty(units, 0, *map_shape))

    @property
    def units(self) -> int:
        return int(self.scores.shape[0])

    def update(self, activations: torch.Tensor, indices: np.ndarray, peaks: torch.Tensor | None = None) -> None:
        """Take a batch ``(N, U, h, w)`` of raw maps (any device) of the images at dataset ``indices``;
        ``peaks``, each map's maximum ``(N, U)``, where the caller has them already."""
        import torch

        acts = activations.detach().float()
        n = acts.shape[0]
        if peaks is None:
            peaks = acts.amax(dim=(2, 3))
        peaks = peaks.float().T.cpu()  # (U, N)
        ids = torch.from_numpy(np.asarray(indices, dtype=np.int64)).expand(self.units, n)
        if self.scores.shape[1] == self.k > 0:
            # Once k images are kept, only a unit with an image at least as good as its worst kept one (a tie
            # may win on its index; NaN sorts first) can change: the others are left as they are.
            worst = self.scores[:, -1:]
            rows = torch.nonzero(((peaks >= worst) | peaks.isnan()).any(dim=1)).flatten()
            if rows.numel() < self.units:
                if rows.numel():
                    self._keep_rows(rows, peaks, ids, acts)
                return
        self._keep(peaks, ids, lambda unit, position: acts[position.to(acts.device), unit.to(acts.device)].cpu())

    def _keep_rows(self, rows: torch.Tensor, peaks: torch.Tensor, ids: torch.Tensor, acts: torch.Tensor) -> None:
        """``_keep`` for the units ``rows`` only."""
        part = TopImagesPartial(self.k, self.scores[rows], self.indices[rows], self.maps[rows])
        on_device = rows.to(acts.device)
        part._keep(peaks[rows], ids[rows],
                   lambda unit, position: acts[position.to(acts.device), on_device[unit.to(acts.device)]].cpu())
        self.scores[rows], self.indices[rows], self.maps[rows] = part.scores, part.indices, part.maps

    def merge(self, other: TopImagesPartial) -> TopImagesPartial:
        """The k best of both (returned; this partial is reused)."""
        if (other.units, other.k, other.maps.shape[2:]) != (self.units, self.k, self.maps.shape[2:]):
            raise ValueError("top images of different layers cannot be merged")
        self._keep(other.scores, other.indices, lambda unit, position: other.maps[unit, position])
        return self

    def _keep(self, scores: torch.Tensor, ids: torch.Tensor,
              maps_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Keep the k best of the kept images and the candidates; ``maps_of(unit, position)`` gives
        the candidates' maps for (unit, candidate position) pairs."""
        import torch

        kept = self.scores.shape[1]
        all_scores = torch.cat([self.scores, scores], dim=1)
        all_ids = torch.cat([self.indices, ids], dim=1)
        keep = min(self.k, all_scores.shape[1])
        # Lower dataset index first, then (stable) higher peak first: a total order.
        by_index = torch.argsort(all_ids, dim=1, stable=True)
        by_score = torch.argsort(torch.gather(all_scores, 1, by_index), dim=1, descending=True, stable=True)
        order = torch.gather(by_index, 1, by_score[:, :keep])
        units = torch.arange(self.units).unsqueeze(1).expand_as(order)
        old = order < kept
        maps = torch.empty(self.units, keep, *self.maps.shape[2:])
        maps[old] = self.maps[units[old], order[old]]
        maps[~old] = maps_of(units[~old], order[~old] - kept)
        self.scores = torch.gather(all_scores, 1, order)
        self.indices = torch.gather(all_ids, 1, order)
        self.maps = maps

    def result(self) -> TopImages:
        return TopImages(self.indices.numpy().copy(), self.scores.double().numpy().copy(), self.maps.numpy().copy())
