"""The ``quantile`` threshold rule: each unit's threshold is its exact (1 − q) activation quantile."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ...core.hookspecs import hookimpl

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ...core.quantile import OrderStatistics

DEFAULT_Q = 0.005

#: Past this many bytes of top-k values (or of histogram counts) per layer, the rule selects by radix.
DEFAULT_MEMORY_CAP = 32 * 2**20


def lite_level(q: float) -> float:
    """NetDissect-Lite reads its quantile readout at index ``int(1000·(1−q)) − 1`` of 1000 points."""
    return (int(1000 * (1 - q)) - 1) / 999


class QuantileRule:
    """Exact and bounded in memory whatever the number of values; mergeable across shards.

    While the k ≈ q·n + 1 largest values per unit fit in ``memory_cap`` bytes, a running top-k answers
    after the activation pass. Past it (an early layer on a large dataset: resnet18 conv1 on all of
    Broden would need about 1 GB), a radix selection over the values' 32-bit keys answers exactly
    after 2 to 8 reads of the maps, with one histogram per unit that fits in ``memory_cap``
    (``digits``, the bits per read, and ``room``, the top-k's insertion room per unit, may be given for tests
    and tuning).
    """

    def __init__(self, units: int, values_per_unit: int, *, q: float = DEFAULT_Q, compat: str = "paper",
                 device: str | torch.device = "cpu", memory_cap: int = DEFAULT_MEMORY_CAP,
                 digits: tuple[int, ...] | None = None, room: int | None = None) -> None:
        from ...core.quantile import RadixSelect, StreamingTopK, radix_digits, values_needed

        if not 0 < q < 1:
            raise ValueError(f"quantile q must be between 0 and 1, got {q}")
        self.q, self.compat, self.units = q, compat, units
        if compat == "lite":
            self.level, self.method = lite_level(q), "hazen"
        else:
            self.level, self.method = 1 - q, "linear"
        self.expected = values_per_unit
        k = values_needed(values_per_unit, self.level, self.method) + 1
        self._top: StreamingTopK | None = None
        self._select: RadixSelect | None = None
        self.digits: tuple[int, ...] | None = None
        if units * k * 4 <= memory_cap:
            self.mode = "top-k"
            self._top = StreamingTopK(units, k, device=device, room=room)
        else:
            self.mode = "radix"
            self.digits = tuple(digits) if digits is not None else radix_digits(units, memory_cap)
            self._select = RadixSelect(units, self.digits, device=device)

    def update(self, activations: torch.Tensor) -> None:
        if self._top is not None:
            self._top.update(activations)
        else:
            assert self._select is not None
            self._select.update(activations)

    def lower_bound(self) -> torch.Tensor:
        """Per unit, a value the threshold will be at least (``BoundedThresholdRule``): the top-k's k-th
        largest so far, below the value numpy interpolates up from; nothing (-inf) for the radix selection,
        which reads every map again."""
        import torch

        if self._top is not None:
            return self._top.lower_bound()
        return torch.full((self.units,), -torch.inf)

    def merge(self, other: QuantileRule) -> QuantileRule:
        """Combine another shard's state of the same read into this one (returned)."""
        if not isinstance(other, QuantileRule) or (other.q, other.compat, other.units, other.mode, other.digits) != (
                self.q, self.compat, self.units, self.mode, self.digits):
            raise ValueError("only states of the same quantile rule (same q, compat, units and mode) can be merged")
        if self._top is not None:
            assert other._top is not None
            self._top.merge(other._top)
        else:
            assert self._select is not None and other._select is not None
            self._select.merge(other._select)
        return self

    def next_round(self) -> QuantileRule | None:
        """None when ``finish`` can answer; else the state for another read of every map."""
        if self._select is None or self._select.resolved:
            return None
        self._check_count(self._select.total or self._select.count)
        following = self._select.advance(self._statistics)
        if following.resolved:
            self._select = following
            return None
        state = copy.copy(self)
        state._select = following
        return state

    def finish(self) -> np.ndarray:
        from ...core.quantile import keys_to_values, lerp, quantile_from_top

        if self._top is not None:
            n = self._top.count
            self._check_count(n)
            return quantile_from_top(self._top.ascending(), n, self.level, self.method)
        assert self._select is not None
        if self._select.keys is None:
            raise RuntimeError("the radix selection needs another read of the maps before it can finish "
                               "(ask next_round)")
        assert self._select.total is not None
        previous, following = (keys_to_values(k) for k in self._select.keys)
        return lerp(previous, following, self._statistics(self._select.total).gamma) + 0.0

    def _statistics(self, n: int) -> OrderStatistics:
        from ...core.quantile import order_statistics

        return order_statistics(n, self.level, self.method)

    def _check_count(self, n: int) -> None:
        if n > self.expected:
            raise RuntimeError(f"the rule was sized for {self.expected} values per unit but saw {n}")

    @property
    def buffer_bytes(self) -> int:
        """The bytes the rule's state holds: its top-k buffer (the k values and room to insert more), or its
        radix histograms."""
        if self._top is not None:
            return self._top.buffer_bytes
        assert self._select is not None
        return self._select.buffer_bytes


@hookimpl
def dissect_register_thresholds(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "quantile",
        QuantileRule,
        description="exact (1 − q) quantile of each unit's raw activations (q = 0.005, the paper's top 0.5%)",
    )
