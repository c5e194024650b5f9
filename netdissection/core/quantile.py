"""Exact per-unit quantiles in bounded memory, with numpy's own interpolation arithmetic.

numpy.quantile (method "linear", and "hazen" at NetDissect-Lite's level) reads two neighbouring
order statistics of a unit's n sorted values and interpolates between them. Two ways find them exactly:

* ``StreamingTopK``: only the largest n − ⌊(n − 1)·level⌋ values (≈ q·n + 1) decide the quantile, so a
  running top-k per unit answers after one read of the maps. Its memory grows with n.
* ``RadixSelect``: float32 values map to 32-bit keys in the same order. A histogram of the keys'
  leading bits (per unit; histograms of shards add up) says which bin holds the order statistic; the
  next read histograms the following bits inside that bin only, and so on until all 32 bits are known:
  the key then *is* the value. Its memory is one histogram per unit whatever n; it costs 32 / (bits per
  read) reads of the maps.

Both are exact: the same two float32 values numpy would pick, combined by numpy's lerp. −0.0 and 0.0
are one value here (a threshold is used with a strict >, where they are the same), and the threshold
is then 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

#: Values keyed at once by RadixSelect.update: bounds the temporaries of a read whatever the batch (about
#: 5 four-byte temporaries of this many values, 20 MB; at 2^22 an early layer's reads took 150 MB more than
#: its activation pass). Smaller chunks cost only Python overhead, a few microseconds each.
KEY_CHUNK = 2**20


def virtual_index(n: int, level: float, method: str) -> float:
    """numpy.quantile's virtual index for ``n`` values at ``level`` (0-based, ascending order)."""
    if method == "linear":
        return (n - 1) * level
    if method == "hazen":  # Hyndman & Fan type 5: alpha = beta = 1/2
        return n * level + (0.5 + level * (1 - 0.5 - 0.5)) - 1
    raise ValueError(f"unsupported quantile method {method!r}; use 'linear' or 'hazen'")


@dataclass(frozen=True)
class OrderStatistics:
    """The ascending ranks (0-based) numpy interpolates between, and its weight of the second."""

    previous: int
    following: int
    gamma: float


def order_statistics(n: int, level: float, method: str) -> OrderStatistics:
    """numpy's ``_get_indexes`` and ``_get_gamma``: out-of-range indices clip to the ends."""
    v = virtual_index(n, level, method)
    if v >= n - 1:
        previous = following = n - 1
    elif v < 0:
        previous = following = 0
    else:
        previous = math.floor(v)
        following = previous + 1
    return OrderStatistics(previous, following, v - previous)


#: ``stats_for(n)``: the order statistics wanted among n values.
OrderStatisticsFor = Callable[[int], OrderStatistics]


def lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's ``_lerp``, including its rounding-symmetric form for weights ≥ 0.5."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


def values_needed(n: int, level: float, method: str) -> int:
    """How many of the largest values decide the quantile of ``n`` values."""
    return n - order_statistics(n, level, method).previous


def quantile_from_top(top_ascending: np.ndarray, n: int, level: float, method: str) -> np.ndarray:
    """The quantile of ``n`` values per row, given each row's largest values sorted ascending.

    ``top_ascending`` is ``(rows, k)`` float64 holding the k largest of the n values (k ≥ the number
    ``values_needed`` reports). Bit-identical to ``numpy.quantile`` (with −0.0 read as 0.0).
    """
    _rows, k = top_ascending.shape
    if k < values_needed(n, level, method):
        raise ValueError(f"{k} top values cannot give the quantile of {n} values")
    stats = order_statistics(n, level, method)
    offset = n - k  # ascending index i of all values is column i - offset of the top values
    a = top_ascending[:, stats.previous - offset] + 0.0
    b = top_ascending[:, stats.following - offset] + 0.0
    return lerp(a, b, stats.gamma).astype(np.float64) + 0.0


#: The least insertion room of a running top-k, in values per unit times units (4 MB of float32): bounds the
#: number of column chunks a batch is split into when k is small.
MIN_ROOM_VALUES = 2**20


class StreamingTopK:
    """Keeps the k largest values of each unit over a stream of activation batches; mergeable.

    Each unit's row of a buffer holds a superset of its k largest values so far, with room for ``room``
    more (an eighth of k, at least ``MIN_ROOM_VALUES`` over all units). A batch adds only the values above
    the row's *floor*, the k-th largest value at the row's last compaction: nothing at or below it can be
    among the k largest. When a row would overflow, the full rows are compacted to their k largest (a
    ``topk`` over a few rows at a time). After the first batches almost no value passes the floor, so a
    batch costs a comparison and a scan of its values, and the memory is the buffer, ``(k + room)`` values
    per unit, with no temporary of the buffer's size.
    """

    def __init__(self, units: int, k: int, device: torch.device | str = "cpu", room: int | None = None) -> None:
        self.units, self.k = units, k
        self.room = room if room is not None else max(k // 8, -(-MIN_ROOM_VALUES // max(units, 1)))
        if self.room < 1:
            raise ValueError(f"the insertion room must hold at least one value, not {self.room}")
        self.capacity = k + self.room
        self.count = 0
        self._buffer = torch.empty(units, self.capacity, device=device)
        self._fill = torch.zeros(units, dtype=torch.int64, device=device)  # values held per row
        # NaN until a row is first compacted: every value compares as a candidate (x <= NaN is False).
        self._floor = torch.full((units,), torch.nan, device=device)

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def buffer_bytes(self) -> int:
        return self._buffer.element_size() * self._buffer.numel()

    def update(self, activations: torch.Tensor) -> None:
        """Take ``(N, units, h, w)`` activations (any spatial size)."""
        _n, units = activations.shape[:2]
        if units != self.units:
            raise ValueError(f"expected {self.units} units, got {units}")
        flat = activations.detach().transpose(0, 1).reshape(units, -1).float()
        self.count += flat.shape[1]
        self._insert(flat.to(self.device))

    def merge(self, other: StreamingTopK) -> StreamingTopK:
        """The k largest of both streams: exactly what one stream of all the values would keep."""
        if (other.units, other.k) != (self.units, self.k):
            raise ValueError("top-k buffers of different sizes cannot be merged")
        self.count += other.count
        self._insert(other.kept().to(self.device))
        return self

    def lower_bound(self) -> torch.Tensor:
        """``(units,)``: a value each unit's k-th largest, over this stream and any it is merged with, is at
        least: the k-th largest at the row's last compaction (-inf before its first)."""
        return torch.nan_to_num(self._floor, nan=-torch.inf)

    def kept(self) -> torch.Tensor:
        """``(units, min(count, k))``: the k largest values of each unit so far, in no order."""
        self._compact()
        held = int(self._fill.max()) if self.units else 0
        return self._buffer[:, :held]

    def ascending(self) -> np.ndarray:
        """The kept values, float64, sorted ascending per unit."""
        return np.sort(self.kept().double().cpu().numpy(), axis=1)

    def _insert(self, flat: torch.Tensor) -> None:
        # In column chunks no wider than the room: a compacted row (k values) always has space for one.
        for start in range(0, flat.shape[1], self.room):
            chunk = flat[:, start:start + self.room]
            # "not at or below the floor" rather than "above": a NaN value stays a candidate (as torch.topk
            # keeps it), and a NaN floor (a row never compacted) lets every value through.
            candidate = torch.le(chunk, self._floor.unsqueeze(1)).logical_not_()
            unit, column = torch.nonzero(candidate, as_tuple=True)  # row-major: grouped by unit
            if unit.numel() == 0:
                continue
            per_unit = torch.bincount(unit, minlength=self.units)
            if int((self._fill + per_unit).max()) > self.capacity:
                self._compact()
            first = torch.cumsum(per_unit, 0) - per_unit  # where each unit's candidates start in ``unit``
            rank = torch.arange(unit.numel(), device=flat.device) - first.index_select(0, unit)
            slot = unit * self.capacity + self._fill.index_select(0, unit) + rank
            self._buffer.view(-1).index_copy_(0, slot, chunk[unit, column])
            self._fill += per_unit

    def _compact(self) -> None:
        """Cut every row holding more than k values to its k largest, and raise its floor."""
        full = torch.nonzero(self._fill > self.k).flatten()
        if full.numel() == 0:
            return
        positions = torch.arange(self.capacity, device=self.device)
        step = max(1, MIN_ROOM_VALUES // self.capacity)  # rows at a time: bounded temporaries
        for start in range(0, full.numel(), step):
            rows = full[start:start + step]
            block = self._buffer.index_select(0, rows)
            # Unused slots read as -inf, the least value: never kept over a held one of the same row.
            block.masked_fill_(positions >= self._fill.index_select(0, rows).unsqueeze(1), -torch.inf)
            top = torch.topk(block, self.k, dim=1, largest=True, sorted=False).values
            self._buffer[rows, :self.k] = top
            self._floor[rows] = top.amin(dim=1)
        self._fill[full] = self.k


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the float32 ``values``: a < b ⇔ key(a) < key(b), −0.0 as 0.0.

    IEEE floats of one sign order like their bit patterns (reversed for negatives): flipping the
    magnitude bits of negative values makes the signed integers order like the floats.
    """
    keys = (values.float() + 0.0).contiguous().view(torch.int32)  # a new tensor: changed in place below
    flip = keys >> 31
    flip &= INT32_MAX
    keys ^= flip
    return keys


def keys_to_values(keys: np.ndarray) -> np.ndarray:
    """The float32 values (as float64) of int32 order keys: ``order_keys`` undone."""
    k = np.asarray(keys, dtype=np.int64).astype(np.int32)
    bits = np.where(k < 0, k ^ np.int32(INT32_MAX), k).astype(np.int32)
    return bits.view(np.float32).astype(np.float64)


def radix_digits(units: int, memory_cap: int, widest: int = 16, narrowest: int = 4) -> tuple[int, ...]:
    """Bits per read for a radix selection whose histograms (``units`` × 2^bits × 8 bytes) fit in
    ``memory_cap``: the fewest reads that fit, the 32 bits split evenly among them."""
    reads = math.ceil(32 / widest)
    while math.ceil(32 / reads) > narrowest and units * 2 ** math.ceil(32 / reads) * 8 > memory_cap:
        reads += 1
    base, extra = divmod(32, reads)
    return tuple(base + 1 if i < extra else base for i in range(reads))


class RadixSelect:
    """One read of an exact radix selection of one order statistic per unit (and its successor).

    A state counts, per unit, the values whose key starts with the unit's ``prefix`` (the bits found
    so far) by their next ``digits[read]`` bits. ``advance`` on the state merged over every shard
    picks the bin holding the wanted rank and returns the state for the next read, until the keys are
    whole. The successor (numpy's second value) is the same key while the rank after it lies in the
    same final bin, else the next non-empty final bin, else the smallest key above the bracket,
    tracked in the last read.
    """

    def __init__(self, units: int, digits: tuple[int, ...], device: torch.device | str = "cpu", read: int = 0
                 ) -> None:
        if sum(digits) != 32 or max(digits) > 16:
            raise ValueError(f"digits must add up to 32 bits, at most 16 per read: {digits}")
        self.units, self.digits = units, digits
        self.read = read
        self.count = 0  # values per unit seen in this read
        self.total: int | None = None  # values per unit, from the first read
        self.prefix = torch.zeros(units, dtype=torch.int64, device=device)  # unsigned bits found so far
        self.below = torch.zeros(units, dtype=torch.int64, device=device)  # values below the bracket
        self.min_above = torch.full((units,), INT32_MAX, dtype=torch.int64, device=device)
        # Per unit and bin, the values counted; one more count at the end for those outside the bracket.
        self.counts = torch.zeros(units * 2 ** digits[read] + 1, dtype=torch.int64, device=device)
        self.keys: tuple[np.ndarray, np.ndarray] | None = None  # (rank's key, successor's key) when done

    @property
    def resolved(self) -> bool:
        return self.keys is not None

    @property
    def hist(self) -> torch.Tensor:
        """``(units, 2^bits)``: the values of each unit's bracket counted by their next bits."""
        return self.counts[:-1].view(self.units, -1)

    @property
    def buffer_bytes(self) -> int:
        tensors = (self.prefix, self.below, self.min_above, self.counts)
        return sum(t.element_size() * t.numel() for t in tensors)

    def update(self, activations: torch.Tensor) -> None:
        """Count a batch ``(N, units, h, w)`` of raw maps."""
        n, units = activations.shape[:2]
        if units != self.units:
            raise ValueError(f"expected {self.units} units, got {units}")
        if self.resolved:
            raise RuntimeError("the selection is complete; it takes no more values")
        bits, known = self.digits[self.read], sum(self.digits[: self.read])
        last = self.read == len(self.digits) - 1
        shift = 32 - known - bits
        device = self.counts.device
        # int32 bin indices (half the bytes of int64, and index_add_ takes them) unless the bins outgrow it.
        index_type = torch.int32 if (units << bits) < INT32_MAX else torch.int64
        offsets = (torch.arange(units, device=device, dtype=index_type) << bits).view(1, units, 1, 1)
        prefix = self.prefix.to(torch.int32).view(1, units, 1, 1)
        outside = units << bits  # the last count: values outside the bracket
        ones = torch.ones(1, dtype=torch.int64, device=device)
        step = max(1, KEY_CHUNK // max(1, activations[0].numel()))
        for start in range(0, n, step):
            # In place where it can be: these few integer operations on every value are the cost of a read.
            unsigned = order_keys(activations[start:start + step].detach().to(device))
            unsigned ^= INT32_MIN  # the same order read as unsigned bits: logical shifts below
            index = (unsigned >> shift).to(index_type)
            index &= (1 << bits) - 1
            index += offsets
            if known:
                head = unsigned >> (32 - known)
                head &= (1 << known) - 1
                index.masked_fill_(head != prefix, outside)
                if last:  # the successor may lie above the bracket: keep the smallest key there
                    unsigned ^= INT32_MIN  # signed keys again
                    unsigned.masked_fill_(head <= prefix, INT32_MAX)
                    above = unsigned.amin(dim=(0, 2, 3)).long()
                    self.min_above = torch.minimum(self.min_above, above)
            index = index.reshape(-1)
            self.counts.index_add_(0, index, ones.expand(index.numel()))
        self.count += n * int(activations.shape[2]) * int(activations.shape[3])

    def merge(self, other: RadixSelect) -> RadixSelect:
        """Add another shard's counts of the same read."""
        if (other.units, other.digits, other.read) != (self.units, self.digits, self.read) or not (
                torch.equal(other.prefix.to(self.prefix.device), self.prefix)):
            raise ValueError("only states of the same read of the same selection can be merged")
        self.counts += other.counts.to(self.counts.device)
        self.min_above = torch.minimum(self.min_above, other.min_above.to(self.min_above.device))
        self.count += other.count
        return self

    def advance(self, stats_for: OrderStatisticsFor) -> RadixSelect:
        """After a read merged over every shard: the state for the next read, or ``self`` resolved. The
        read's counts are used up (turned into running sums): advance a state once."""
        if self.total is None:
            self.total = self.count
            if self.total == 0:
                raise RuntimeError("the selection saw no values")
        elif self.count != self.total:
            raise RuntimeError(f"read {self.read + 1} saw {self.count} values per unit, the first read "
                               f"{self.total}: the maps changed between reads")
        stats = stats_for(self.total)
        rank = stats.previous
        bits = self.digits[self.read]
        # The counts become their running sums in place (a read's counts are spent once it is advanced): no
        # temporary the size of the histograms, which are as large as the memory cap allows.
        cumulative = self.hist.cumsum_(dim=1)
        within = rank - self.below
        if bool(((within < 0) | (within >= cumulative[:, -1])).any()):
            raise RuntimeError("the wanted value left its bracket between reads: the maps changed between reads")
        digit = torch.searchsorted(cumulative, within.unsqueeze(1), right=True).squeeze(1)
        upto = cumulative.gather(1, digit.unsqueeze(1)).squeeze(1)
        before = cumulative.gather(1, (digit - 1).clamp(min=0).unsqueeze(1)).squeeze(1).masked_fill(digit == 0, 0)
        below = self.below + before
        prefix = (self.prefix << bits) | digit
        if self.read + 1 < len(self.digits):
            state = RadixSelect(self.units, self.digits, self.counts.device, read=self.read + 1)
            state.total, state.prefix, state.below = self.total, prefix, below
            return state
        # All 32 bits known: the key of the rank is its prefix; then its successor's.
        key = prefix - 2**31
        if stats.following == stats.previous:
            successor = key
        else:
            # The next non-empty bin is the first whose running sum passes the rank's bin's.
            later = torch.searchsorted(cumulative, upto.unsqueeze(1), right=True).squeeze(1)
            next_key = ((self.prefix << bits) + later - 2**31).masked_fill(later >= cumulative.shape[1], INT32_MAX)
            following = torch.minimum(next_key, self.min_above)
            same = rank + 1 < upto + self.below
            successor = torch.where(same, key, following)
        self.keys = (key.cpu().numpy(), successor.cpu().numpy())
        return self
