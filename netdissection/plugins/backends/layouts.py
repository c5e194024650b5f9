"""Layer output layouts, and their conversion to the ``(N, C, h, w)`` maps the passes take.

Every backend sees three spatial layouts besides plain convolutional maps:

- ``conv``: ``(N, C, h, w)``, taken as is;
- ``channels_last``: ``(N, h, w, C)`` (Swin stages, ConvNeXt block internals, NHWC graphs), transposed;
- ``tokens``: ``(N, P + gh·gw, C)`` (ViT, DeiT, EVA, Mixer blocks): the ``P`` prefix tokens (class,
  distillation, registers) come first and are dropped, and the patch tokens, in row-major order, are
  reshaped to the ``gh × gw`` patch grid.

Anything else (pooled vectors, attention internals of higher rank) is ``vector``: not a spatial map.
Attention probabilities (``(N, heads, queries, keys)``, each row a softmax) are ``attention``: their
shape can pass for a map, but their "units" and "positions" are heads, queries and keys, not channels
over the image, so they are refused by name.

The layout is decided once, on a probe forward pass at a known input size, from the output's shape and
what the model says about itself (``num_prefix_tokens``, patch size). A model that says nothing gets its
prefix and patch size inferred: the fewest prefix tokens that leave a patch grid of the input's aspect
ratio with a whole patch size (``T = 197`` at 224×224 → 1 prefix token, 14×14 patches of 16 px).
The grid is then recomputed for every batch from the batch's own size, so models that take any input
size (``dynamic_img_size``, dynamic ONNX axes) are handled.

A model that can be asked (timm) never has its grid guessed: ``model_token_layout`` takes the strides the
model names (patch sizes, ``feature_info`` reductions) and the prefix count it declares, and the layout it
returns is *strict* — at every batch the tokens must be the prefix plus that stride's grid, or the layer
is refused; a token count is never factored.

This module imports torch lazily: the plugin modules import it only inside their factories anyway, but
shape reasoning (``detect``) needs no framework.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

CONV, CHANNELS_LAST, TOKENS, VECTOR, ATTENTION = "conv", "channels_last", "tokens", "vector", "attention"

#: The most prefix tokens a model is assumed to have when it does not say: class + distillation + up
#: to 8 registers, with room to spare. Inference prefers the fewest that fit.
MAX_PREFIX = 16

#: How far (as a ratio) a map's aspect may stray from the input's before a layout guess is rejected;
#: floor/ceil rounding of small grids (e.g. 40×24 px at patch 16 → 2×1) needs some slack.
_ASPECT_SLACK = math.log(1.5)


@dataclass(frozen=True)
class Layout:
    """How one layer's output maps to ``(N, C, h, w)``; ``prefix``/``patch`` matter for tokens only.

    ``strict`` tokens have their grid from ``patch`` (the stride) alone, rounded down or up; any other token
    count is an error, never a factorisation.
    """

    kind: str
    prefix: int = 0
    patch: tuple[int, int] | None = None
    strict: bool = False

    @property
    def spatial(self) -> bool:
        return self.kind in (CONV, CHANNELS_LAST, TOKENS)

    def map_shape(self, shape: tuple[int, ...], input_hw: tuple[int, int]) -> tuple[int, ...]:
        """The per-image shape after conversion (``(C, h, w)`` for spatial kinds) of an output of ``shape``
        (without the batch dimension) for an input of ``input_hw``."""
        if self.kind == CONV:
            return tuple(shape)
        if self.kind == CHANNELS_LAST:
            return (shape[2], shape[0], shape[1])
        if self.kind == TOKENS:
            grid = self.grid(shape[0], input_hw)
            return (shape[1], *grid)
        return tuple(shape)

    def grid(self, tokens: int, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an output with ``tokens`` tokens (prefix included) for ``input_hw`` images."""
        patches = tokens - self.prefix
        if self.strict:
            assert self.patch is not None
            grid = stride_grid(patches, input_hw, self.patch)
            if grid is None:
                (h, w), (sh, sw) = input_hw, self.patch
                raise ValueError(f"its {tokens} tokens do not fit the model's grid of {-(-h // sh)}×{-(-w // sw)} "
                                 f"(or {h // sh}×{w // sw}) positions at stride {sh} plus {self.prefix} prefix "
                                 f"token(s) for a {h}×{w} input")
            return grid
        grid = token_grid(patches, input_hw, self.patch)
        if grid is None:
            raise ValueError(f"{tokens} tokens ({self.prefix} prefix) make no patch grid for a "
                             f"{input_hw[0]}×{input_hw[1]} input")
        return grid

    def to_map(self, output: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """Convert a batch ``output`` of this layout to a contiguous ``(N, C, h, w)`` map."""
        if self.kind == CONV:
            return output.contiguous()
        if self.kind == CHANNELS_LAST:
            return output.permute(0, 3, 1, 2).contiguous()
        if self.kind == TOKENS:
            n, tokens, channels = output.shape
            gh, gw = self.grid(tokens, input_hw)
            # Prefix tokens come first; the patches follow in row-major order (row by row of the image).
            patches = output[:, self.prefix:, :]
            return patches.transpose(1, 2).reshape(n, channels, gh, gw).contiguous()
        raise ValueError("a vector output has no spatial map")


VECTOR_LAYOUT = Layout(VECTOR)
ATTENTION_LAYOUT = Layout(ATTENTION)


def stride_grid(patches: int, input_hw: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int] | None:
    """The grid of an ``input_hw`` input at ``stride``, rounded down or up, if it has ``patches`` positions."""
    (h, w), (sh, sw) = input_hw, stride
    for grid in ((h // sh, w // sw), (-(-h // sh), -(-w // sw))):
        if grid[0] > 0 and grid[1] > 0 and grid[0] * grid[1] == patches:
            return grid
    return None


def model_token_layout(tokens: int, input_hw: tuple[int, int], strides: Sequence[tuple[int, int]],
                       prefixes: Sequence[int]) -> Layout | None:
    """The strict token layout of ``tokens`` tokens from what a model says: the first of its ``prefixes``
    (prefix counts, most likely first) and ``strides`` that leaves exactly that stride's grid; else None.

    A model whose class token joins late (CaiT: 196 patch tokens in ``blocks``, the class token only in
    ``blocks_token_only``) has layers with no prefix at all, so 0 is among the prefixes tried.
    """
    for prefix in prefixes:
        if prefix < 0 or prefix >= tokens:
            continue
        for stride in strides:
            if stride_grid(tokens - prefix, input_hw, stride) is not None:
                return Layout(TOKENS, prefix, stride, strict=True)
    return None


def attention_probabilities(output: torch.Tensor) -> bool:
    """Whether a batch ``output`` of rank 4 holds probabilities over its last axis, as a softmax leaves them:
    non-negative, every row summing to 1 — attention weights ``(N, heads, queries, keys)``."""
    if output.ndim != 4 or output.shape[-1] < 2 or not output.is_floating_point() or output.numel() == 0:
        return False
    import torch

    def softmax_rows(values: torch.Tensor) -> bool:
        values = values.detach().float()
        if bool((values < 0).any()):
            return False
        sums = values.sum(dim=-1)
        return bool(torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-3))

    # A few rows first: nearly every output that is no softmax fails there, without a pass over all of it.
    return softmax_rows(output[:1, :1, :4]) and softmax_rows(output)


def _aspect_error(h: int, w: int, input_hw: tuple[int, int]) -> float:
    if h <= 0 or w <= 0 or input_hw[0] <= 0 or input_hw[1] <= 0:
        return math.inf
    return abs(math.log(h / w) - math.log(input_hw[0] / input_hw[1]))


def token_grid(patches: int, input_hw: tuple[int, int],
               patch: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The ``(gh, gw)`` grid of ``patches`` tokens for an input of ``input_hw``, or None.

    With a patch size: the input size divided by it, rounded down (patch embedding without padding) or
    up (dynamic padding). Without: the factorisation closest to the input's aspect ratio.
    """
    if patches <= 0:
        return None
    h, w = input_hw
    if patch is not None:
        ph, pw = patch
        for gh, gw in ((h // ph, w // pw), (-(-h // ph), -(-w // pw))):
            if gh * gw == patches:
                return gh, gw
    best: tuple[float, tuple[int, int]] | None = None
    for gh in range(1, math.isqrt(patches) + 1):
        if patches % gh:
            continue
        for grid in ((gh, patches // gh), (patches // gh, gh)):
            error = _aspect_error(*grid, input_hw)
            if best is None or error < best[0]:
                best = (error, grid)
    if best is None or best[0] > _ASPECT_SLACK:
        return None
    return best[1]


def _whole_patch(grid: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """A square patch size ``p`` with ``input // p == grid`` in both directions, or None.

    Requiring one whole, square patch size is what tells a token grid from a transposed ``(C, T)``
    tensor or a pooled vector whose length happens to factor near the input's aspect ratio.
    """
    low, high = 1, max(input_hw)
    for g, size in zip(grid, input_hw, strict=True):
        # p with g·p <= size < (g+1)·p, i.e. size/(g+1) < p <= size/g
        low, high = max(low, size // (g + 1) + 1), min(high, size // g)
    return (high, high) if low <= high else None


def _patch_grids(input_hw: tuple[int, int], patch: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    (h, w), (ph, pw) = input_hw, patch
    return (h // ph, w // pw), (-(-h // ph), -(-w // pw))


def infer_tokens(tokens: int, input_hw: tuple[int, int], prefix: int | None = None,
                 patch: tuple[int, int] | None = None) -> Layout | None:
    """The token layout of a ``(T, C)`` output, or None when ``T`` tokens make no patch grid.

    A known ``prefix`` is tried first. Otherwise the fewest prefix tokens (up to ``MAX_PREFIX``) win that
    leave a grid the input divides exactly into square patches, then the fewest that leave a grid of
    whole square patches under rounding. The layout keeps the model's ``patch`` when it gives the grid,
    else the patch size the grid implies (a later stage of a hierarchical model: Swin's 7×7 at 224 px →
    32), so that the grid can be recomputed for other input sizes.
    """
    def layout(p: int, grid: tuple[int, int]) -> Layout | None:
        if patch is not None and grid in _patch_grids(input_hw, patch):
            return Layout(TOKENS, p, patch)
        whole = _whole_patch(grid, input_hw)
        return Layout(TOKENS, p, whole) if whole is not None else None

    def exact(grid: tuple[int, int]) -> bool:
        (h, w), (gh, gw) = input_hw, grid
        return h % gh == 0 and w % gw == 0 and h // gh == w // gw

    if prefix is not None:
        grid = token_grid(tokens - prefix, input_hw, patch)
        if grid is not None:
            return layout(prefix, grid) or Layout(TOKENS, prefix, None)
    candidates = range(min(MAX_PREFIX, tokens - 1) + 1)
    for p in candidates:  # grids that divide the input exactly: the usual case (224 px, patch 16 → 14×14)
        grid = token_grid(tokens - p, input_hw, patch)
        if grid is not None and exact(grid):
            return layout(p, grid)
    for p in candidates:
        grid = token_grid(tokens - p, input_hw, patch)
        found = layout(p, grid) if grid is not None else None
        if found is not None:
            return found
    return None


def fits(h: int, w: int, input_hw: tuple[int, int]) -> bool:
    """Whether an ``h × w`` map can come from an ``input_hw`` input through one stride in both directions.

    Some stride ``s`` must give ``h`` and ``w`` within one of ``H/s`` and ``W/s`` (padding and rounding
    differ between layers). This tells ``(C, h, w)`` from ``(h, w, C)`` and rejects attention internals
    such as ``(heads, T, d)``.
    """
    if min(h, w, *input_hw) <= 0:
        return False
    low, high = 0.0, float("inf")
    for g, size in ((h, input_hw[0]), (w, input_hw[1])):
        low, high = max(low, size / (g + 1)), min(high, size / max(g - 1, 0.5))
    return low <= high


def detect(shape: tuple[int, ...], input_hw: tuple[int, int], *, prefix: int | None = None,
           patch: tuple[int, int] | None = None) -> Layout:
    """The layout of an output of per-image ``shape`` (no batch dimension) for an input of ``input_hw``.

    A rank-3 shape is ``conv`` when its trailing two dimensions fit the input (see ``fits``) and
    ``channels_last`` when its leading two do instead (a square input: ``(h, w, C)`` with ``h == w``);
    when both fit, the closer aspect ratio wins, ties to ``conv``. A rank-2 shape is ``tokens`` when its
    first dimension makes a patch grid (see ``infer_tokens``). Anything else is ``vector``.
    """
    if len(shape) == 3:
        a, b, c = shape
        conv, last = fits(b, c, input_hw), fits(a, b, input_hw)
        if conv and last:
            last = _aspect_error(a, b, input_hw) < _aspect_error(b, c, input_hw)
            conv = not last
        if conv:
            return Layout(CONV)
        if last:
            return Layout(CHANNELS_LAST)
        return VECTOR_LAYOUT
    if len(shape) == 2:
        layout = infer_tokens(shape[0], input_hw, prefix, patch)
        if layout is not None:
            return layout
    return VECTOR_LAYOUT


def token_hints(model: Any) -> tuple[int | None, tuple[int, int] | None]:
    """What a torch model says about its tokens: ``(prefix tokens, patch size)``, each None if unknown.

    timm ViT-likes carry ``num_prefix_tokens`` and ``patch_embed.patch_size``; torchvision's
    ``VisionTransformer`` has a ``class_token`` and an int ``patch_size``.
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None and getattr(model, "class_token", None) is not None and hasattr(model, "encoder"):
        prefix = 1  # torchvision VisionTransformer: one class token, first
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        patch = getattr(model, "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if patch is not None:
        try:
            patch = (int(patch[0]), int(patch[1]))
        except (TypeError, ValueError, IndexError):
            patch = None
    return (int(prefix) if isinstance(prefix, int) else None), patch


def fit_input(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize a normalised batch bilinearly to a model's fixed input ``size`` (no-op when it fits).

    Only models that cannot take the dataset's image size need it (fixed-size ViTs, ONNX graphs with
    fixed H, W). The maps are upsampled to the label resolution afterwards anyway, so resizing the input
    changes the layer's grid, not the protocol. Antialiasing keeps a downscale faithful.
    """
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
