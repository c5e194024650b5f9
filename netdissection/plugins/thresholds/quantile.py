"""The ``quantile`` threshold rule: each unit's threshold is its exact (1 − q) activation quantile."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.hookspecs import hookimpl

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_Q = 0.005


def lite_level(q: float) -> float:
    """NetDissect-Lite reads its quantile readout at index ``int(1000·(1−q)) − 1`` of 1000 points."""
    return (int(1000 * (1 - q)) - 1) / 999


class QuantileRule:
    """Exact, streaming and bounded in memory: a running top-k per unit (k ≈ q·n + 1)."""

    def __init__(self, units: int, values_per_unit: int, *, q: float = DEFAULT_Q, compat: str = "paper",
                 device: str | torch.device = "cpu") -> None:
        from ...core.quantile import StreamingTopK, values_needed

        if not 0 < q < 1:
            raise ValueError(f"quantile q must be between 0 and 1, got {q}")
        self.q = q
        if compat == "lite":
            self.level, self.method = lite_level(q), "hazen"
        else:
            self.level, self.method = 1 - q, "linear"
        self.expected = values_per_unit
        k = values_needed(values_per_unit, self.level, self.method) + 1
        self._top = StreamingTopK(units, k, device=device)

    def update(self, activations: torch.Tensor) -> None:
        self._top.update(activations)

    def finish(self) -> np.ndarray:
        from ...core.quantile import quantile_from_top

        n = self._top.count
        if n > self.expected:
            raise RuntimeError(f"the rule was sized for {self.expected} values per unit but saw {n}")
        return quantile_from_top(self._top.ascending(), n, self.level, self.method)

    @property
    def buffer_bytes(self) -> int:
        return self._top.values.element_size() * self._top.values.numel()


@hookimpl
def dissect_register_thresholds(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "quantile",
        QuantileRule,
        description="exact (1 − q) quantile of each unit's raw activations (q = 0.005, the paper's top 0.5%)",
    )
