"""A batch's tensors sent from a loader worker to the main process as one block of shared memory.

torch sends every tensor of a worker's batch in a shared-memory segment of its own: the worker creates,
fills and maps a segment per tensor, and the main process connects back to the worker for each segment's
file descriptor (a socket connection with an authentication handshake). A batch of the IoU pass holds about
ten tensors (the labels, and what the worker prepared of them: label sets, per-pixel set ids, truth counts),
and on a machine with few cores those round trips come out of the decoding workers' time, which is the IoU
pass's critical path. :func:`packed` copies a structure's tensors into one shared block in the worker, and
:func:`unpacked` gives the main process views of that block: one segment and one connection a batch.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import torch

#: Each tensor starts at a multiple of this many bytes in the block (a cache line: aligned for every dtype).
ALIGNMENT = 64

#: (dtype, shape, offset in bytes) of each tensor in the block, in the order the pickle refers to them.
Layout = list[tuple[torch.dtype, tuple[int, ...], int]]


def packed(value: Any) -> tuple[bytes, torch.Tensor, Layout]:
    """``value`` (any picklable structure) as a pickle that refers to its tensors by number, one shared
    uint8 block holding every tensor's values (contiguous, in order), and where each one lies in it."""
    stream = io.BytesIO()
    pickler = _TensorsApart(stream)
    pickler.dump(value)
    tensors = pickler.tensors
    layout: Layout = []
    size = 0
    for tensor in tensors:
        layout.append((tensor.dtype, tuple(tensor.shape), size))
        size += -(-_nbytes(tensor.dtype, tuple(tensor.shape)) // ALIGNMENT) * ALIGNMENT
    # In shared memory before it is filled: pickling then sends it as it is, without another copy.
    block = torch.empty(max(size, 1), dtype=torch.uint8).share_memory_()
    for tensor, view in zip(tensors, _views(block, layout), strict=True):
        view.copy_(tensor)
    return stream.getvalue(), block, layout


def unpacked(payload: bytes, block: torch.Tensor, layout: Layout) -> Any:
    """What :func:`packed` was given, its tensors views of ``block``."""
    return _TensorsFromBlock(io.BytesIO(payload), _views(block, layout)).load()


# Module-level classes: a class made per call lives in a reference cycle (as every class does) and would hold
# the batch's tensors, through its closure, until the cyclic garbage collector runs.
class _TensorsApart(pickle.Pickler):
    """Pickles a structure with its CPU tensors left out, numbered in ``tensors``."""

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _TensorsFromBlock(pickle.Unpickler):
    """Unpickles what ``_TensorsApart`` pickled, each numbered tensor one of ``views``."""

    def __init__(self, stream: io.BytesIO, views: list[torch.Tensor]) -> None:
        super().__init__(stream)
        self.views = views

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.views[pid]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _views(block: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    return [block[offset:offset + _nbytes(dtype, shape)].view(dtype).view(shape) for dtype, shape, offset in layout]
