"""A batch's maps put together from the maps of its chunks, as the model ran them a few images at a time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import DissectionError

if TYPE_CHECKING:
    import torch


def gathered(parts: Iterable[dict[str, torch.Tensor]], total: int) -> dict[str, torch.Tensor]:
    """Chunks' outputs (per layer, chunk after chunk) as one batch's: written into one tensor per layer as they
    come, never the chunks' and the batch's tensors all at once."""
    whole: dict[str, torch.Tensor] = {}
    first: dict[str, int] = {}  # images in the first chunk, per layer
    at = 0
    for part in parts:
        for name, out in part.items():
            if name not in whole:
                whole[name], first[name] = out.new_empty((total, *out.shape[1:])), len(out)
            elif out.shape[1:] != whole[name].shape[1:]:
                raise DissectionError(
                    f"layer {name!r}: its maps have shape {tuple(whole[name].shape[1:])} for {first[name]} images run "
                    f"at once and {tuple(out.shape[1:])} for {len(out)}; the model's maps must not depend on how "
                    "many images it runs at once")
            whole[name][at:at + len(out)].copy_(out)
        at += len(next(iter(part.values()))) if part else 0
    return whole
