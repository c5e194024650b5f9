"""The layers of a timm model, taken from the model itself.

Stages (``stage:N``) are what timm's own ``forward_intermediates(x, indices, intermediates_only=True,
output_fmt="NCHW")`` returns: NCHW maps with the prefix tokens removed and the grid restored, by the
model's own code — also for models that reorder their tokens, split them into branches (CrossViT) or tap
a stage inside a block (Xception). Each stage is also *resolved* to the module whose output is that same
map on the probe pass (``stages.3``; Twins' ``block.3`` is ``blocks.3.1``, HRNet's ``stage4`` is
``incre_modules.3``), which names the stage in results and lets it share a pass with module layers that
``forward_intermediates`` does not run.

Module layers (any ``named_modules()`` path) are hooked. A token output ``(N, T, C)`` gets its grid from
the model — the strides it names (patch sizes, ``feature_info`` reductions, the stage maps' own strides)
and the prefix tokens it declares (``num_prefix_tokens``, or none: CaiT's ``blocks`` hold 196 patch
tokens, its class token joins only in ``blocks_token_only``). The count is checked at every batch; when
it does not fit, the layer is refused in one line. A token count is never factored into a grid.

Every requested layer, stages and modules together, comes out of one forward pass per batch: the hooks
fire inside ``forward_intermediates`` as they do inside ``forward``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import DissectionError
from ...core.types import LayerInfo
from .layouts import MAX_PREFIX, VECTOR_LAYOUT, Layout, model_token_layout
from .stages import stage_names
from .torch_common import HookedModel, LayoutOf, layer_info

log = logging.getLogger(__name__)

#: How a stage map and a module's map may differ and still be the same map (float reassociation only).
_SAME_MAP = {"rtol": 1e-5, "atol": 1e-6}

# How far a forward_intermediates call must run for the module layers asked with the stages.
_EARLY, _FEATURES, _HEAD = 0, 1, 2


@dataclass(frozen=True)
class TimmStage:
    """One stage: its index, map shape ``(C, h, w)`` at the probe size, timm's name for it, and the module
    whose output is the same map (None when no module's is)."""

    index: int
    shape: tuple[int, int, int]
    timm_name: str
    module: str | None

    @property
    def described(self) -> str:
        """The module it resolved to, else timm's own name for it."""
        return self.module or self.timm_name


def _feature_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    entries = getattr(info, "info", info) or []
    return [str(e.get("module", "")) if isinstance(e, dict) else "" for e in entries]


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value) if value > 0 else None
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    return None


def model_strides(model: nn.Module, stage_shapes: Sequence[tuple[int, ...]], input_hw: tuple[int, int]) -> list[
        tuple[int, int]]:
    """Every stride the model names: its patch embeddings' strides, its ``feature_info`` reductions, and
    the strides its stage maps show at the probe size — in that order, without repeats."""
    strides: list[tuple[int, int]] = []
    for module in model.modules():
        patch = _pair(getattr(module, "patch_size", None))
        if patch is None:
            continue
        # An overlapping embedding (PVT v2: a 7×7 kernel at stride 4) names its kernel as patch_size.
        proj = getattr(module, "proj", None)
        strides.append(_pair(tuple(proj.stride)) or patch if isinstance(proj, nn.Conv2d) else patch)
    info = getattr(model, "feature_info", None)
    for entry in getattr(info, "info", info) or []:
        reduction = _pair(entry.get("reduction")) if isinstance(entry, dict) else None
        if reduction is not None:
            strides.append(reduction)
    for shape in stage_shapes:
        h, w = shape[-2:]
        if h and w and input_hw[0] % h == 0 and input_hw[1] % w == 0:
            strides.append((input_hw[0] // h, input_hw[1] // w))
    return list(dict.fromkeys(strides))


def model_prefixes(model: nn.Module) -> list[int]:
    """Prefix token counts to try, most likely first: the one the model declares, then none (layers before the
    class token joins); a model that declares nothing may have any small number (CrossViT's class token)."""
    declared = getattr(model, "num_prefix_tokens", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
        return list(dict.fromkeys([declared, 0]))
    return list(range(MAX_PREFIX + 1))


def timm_layout_of(strides: Sequence[tuple[int, int]], prefixes: Sequence[int]) -> LayoutOf:
    """Layouts whose token grids come from the model (strict: a count off the grid is refused)."""

    def layout_of(name: str, output: Any, batch: int, input_hw: tuple[int, int]) -> tuple[LayerInfo, Layout] | None:
        def tokens(shape: tuple[int, ...]) -> tuple[Layout, str]:
            count = shape[0]
            layout = model_token_layout(count, input_hw, strides, prefixes)
            if layout is not None:
                return layout, ""
            return VECTOR_LAYOUT, (f"{count} token{'s, which fit' if count != 1 else ', which fits'} no grid of "
                                   f"the model ({_grids(strides, prefixes, input_hw)})")

        return layer_info(name, output, batch, input_hw, tokens)

    return layout_of


def _grids(strides: Sequence[tuple[int, int]], prefixes: Sequence[int], input_hw: tuple[int, int]) -> str:
    h, w = input_hw
    grids = list(dict.fromkeys(f"{-(-h // sh)}×{-(-w // sw)}" for sh, sw in strides[:4]))
    prefix = f"plus {prefixes[0]} prefix token{'s' if prefixes[0] != 1 else ''}" if len(prefixes) <= 2 else \
        "plus up to a few prefix tokens"
    return f"{' or '.join(grids) or 'none'} positions {prefix}, at {h}×{w} inputs"


class _StageMatcher:
    """Finds, on the probe pass, the modules whose output is the same map as each stage's."""

    def __init__(self, stage_maps: Sequence[torch.Tensor], layout_of: LayoutOf, batch: int,
                 input_hw: tuple[int, int]) -> None:
        self.stage_maps = stage_maps
        self.layout_of, self.batch, self.input_hw = layout_of, batch, input_hw
        self.matches: list[list[str]] = [[] for _ in stage_maps]
        # One sum per map tells most maps apart at the cost of a reduction; only equal sums are compared in full.
        self.sums = [float(m.double().sum()) for m in stage_maps]
        self.slack = [float(m.abs().sum()) * _SAME_MAP["rtol"] + m.numel() * _SAME_MAP["atol"] for m in stage_maps]

    def see(self, name: str, output: Any) -> None:
        for found in self.matches:  # a module called again: its last call is what a hook captures
            if name in found:
                found.remove(name)
        layer = self.layout_of(name, output, self.batch, self.input_hw)
        if layer is None or not layer[1].spatial:
            return
        try:
            mapped = layer[1].to_map(output, self.input_hw)
        except ValueError:
            return
        total = None
        for found, stage, stage_sum, slack in zip(self.matches, self.stage_maps, self.sums, self.slack, strict=True):
            if mapped.shape != stage.shape:
                continue
            if total is None:
                total = float(mapped.double().sum())
            if abs(total - stage_sum) <= slack and torch.allclose(mapped.float(), stage.float(), **_SAME_MAP):
                found.append(name)

    def resolved(self, index: int, timm_name: str) -> str | None:
        """timm's own name when it is among the matches; else the outermost match made first (a later one
        with the same map only passes it on: an Identity, a Dropout in eval mode)."""
        found = self.matches[index]
        if timm_name in found:
            return timm_name
        outermost = [n for n in found if not any(n.startswith(other + ".") for other in found if other != n)]
        return outermost[0] if outermost else None


class TimmLayers:
    """Module and stage layers of a timm model, probed once; maps for a batch from one forward pass."""

    def __init__(self, model: nn.Module, probe_input: torch.Tensor, model_name: str) -> None:
        self.model, self.model_name = model, model_name
        input_hw = (int(probe_input.shape[-2]), int(probe_input.shape[-1]))
        self.positions: dict[str, int] = {}  # completion order inside forward_intermediates
        self.head_modules: set[str] = set()  # modules forward_head runs
        stage_maps = self._probe_intermediates(probe_input)
        self.intermediates = stage_maps is not None
        shapes = [tuple(m.shape[1:]) for m in stage_maps or []]
        self.strides = model_strides(model, shapes, input_hw)
        self.prefixes = model_prefixes(model)
        layout_of = timm_layout_of(self.strides, self.prefixes)
        matcher = _StageMatcher(stage_maps or [], layout_of, int(probe_input.shape[0]), input_hw)
        self.hooked = HookedModel(model, probe_input, model_name=model_name, layout_of=layout_of,
                                  on_output=matcher.see)
        names = _feature_names(model)
        if stage_maps is not None:
            self.stages = [TimmStage(i, tuple(int(d) for d in m.shape[1:]),  # type: ignore[arg-type]
                                     names[i] if i < len(names) else f"index {i}",
                                     matcher.resolved(i, names[i] if i < len(names) else ""))
                           for i, m in enumerate(stage_maps)]
        else:
            self.stages = self._hooked_stages(names)
        self.aliases: dict[str, int] = {}
        for stage, (name, from_end) in zip(self.stages, stage_names(len(self.stages)), strict=True):
            self.aliases[name] = self.aliases[from_end] = stage.index

    def _probe_intermediates(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every stage map from ``forward_intermediates`` on the probe, noting where each module runs (inside
        it, in completion order, or in ``forward_head``); None for a model without it."""
        run = getattr(self.model, "forward_intermediates", None)
        if run is None:
            return None
        phase = {"head": False}
        order: list[str] = []

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(_m: nn.Module, _i: Any, _out: Any) -> None:
                if phase["head"]:
                    self.head_modules.add(name)
                else:
                    self.positions[name] = len(order)
                    order.append(name)
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n]
        try:
            with torch.inference_mode():
                final, maps = run(x, indices=None, intermediates_only=False, stop_early=False, output_fmt="NCHW")
                phase["head"] = True
                try:
                    self.model.forward_head(final)
                except Exception as exc:  # the head's modules then run only in the model's own forward
                    log.debug("%s: forward_head after forward_intermediates failed: %s", self.model_name, exc)
        except Exception as exc:  # an architecture whose forward_intermediates does not take these arguments
            log.debug("%s: no forward_intermediates (%s); stages from feature_info hooks", self.model_name, exc)
            self.positions.clear()
            self.head_modules.clear()
            return None
        finally:
            for h in handles:
                h.remove()
        if not isinstance(maps, list | tuple) or not all(isinstance(m, torch.Tensor) and m.ndim == 4 for m in maps):
            return None
        return [m.contiguous() for m in maps]

    def _hooked_stages(self, names: Sequence[str]) -> list[TimmStage]:
        """Without ``forward_intermediates``: the ``feature_info`` modules hooked, as ``features_only`` does."""
        known = {i.name: i for i in self.hooked.infos}
        stages = []
        for name in names:
            for candidate in (name, name.replace("_", ".")):
                info = known.get(candidate)
                if info is not None and info.spatial:
                    stages.append(TimmStage(len(stages), info.shape, name, candidate))  # type: ignore[arg-type]
                    break
            else:
                log.debug("%s: feature_info stage %s is no module map the probe saw", self.model_name, name)
        return stages

    # ---- what the backend lists ----------------------------------------------------------------------------

    def infos(self) -> list[LayerInfo]:
        """Every module layer in execution order, then each stage under both of its names."""
        aliases = []
        for stage, names in zip(self.stages, stage_names(len(self.stages)), strict=True):
            aliases += [LayerInfo(name, "conv", stage.shape, module=stage.described) for name in names]
        return [*self.hooked.infos, *aliases]

    def stage(self, name: str) -> TimmStage | None:
        index = self.aliases.get(name)
        return self.stages[index] if index is not None else None

    # ---- maps for a batch ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """One forward pass of ``x``; a map per requested layer (stage names and module paths together)."""
        stages = {name: self.aliases[name] for name in layers if name in self.aliases}
        modules = list(dict.fromkeys(name for name in layers if name not in self.aliases))
        if not stages:
            return self.hooked.forward(x, modules)
        indices = sorted(set(stages.values()))
        reach = self._reach(indices[-1], modules) if self.intermediates else None
        if reach is None:  # stages through the modules they resolved to, in the model's own forward
            return self._by_modules(x, stages, modules)
        full = reach > _EARLY
        run = self.model.forward_intermediates  # type: ignore[operator]

        def forward() -> list[torch.Tensor]:
            out = run(x, indices=indices, intermediates_only=not full, stop_early=not full, output_fmt="NCHW")
            if not full:
                return out
            final, maps = out
            if reach == _HEAD:
                self.model.forward_head(final)  # type: ignore[operator]
            return maps

        captured, maps = self.hooked.capture(forward, modules, stop_when_done=False)
        if len(maps) != len(indices):
            raise DissectionError(f"timm's forward_intermediates of {self.model_name} returned {len(maps)} maps for "
                                  f"{len(indices)} stages")
        by_index = dict(zip(indices, maps, strict=True))
        out = self.hooked.maps(captured, (int(x.shape[-2]), int(x.shape[-1])))
        out.update({name: by_index[index].contiguous() for name, index in stages.items()})
        return out

    def _reach(self, last_stage: int, modules: Sequence[str]) -> int | None:
        """How far ``forward_intermediates`` must run (and whether ``forward_head`` must follow) for ``modules``
        to run in the same call as stages up to ``last_stage``; None when one of them runs only in ``forward``."""
        anchor_module = self.stages[last_stage].module
        anchor = self.positions.get(anchor_module) if anchor_module is not None else None
        reach = _EARLY
        for name in modules:
            if name in self.positions:
                if anchor is None or self.positions[name] > anchor:
                    reach = max(reach, _FEATURES)
            elif name in self.head_modules:
                reach = _HEAD
            else:
                return None
        return reach

    def _by_modules(self, x: torch.Tensor, stages: dict[str, int], modules: Sequence[str]) -> dict[str, torch.Tensor]:
        unresolved = [name for name, index in stages.items() if self.stages[index].module is None]
        if unresolved:
            stage = self.stages[stages[unresolved[0]]]
            raise DissectionError(
                f"{unresolved[0]} ({stage.timm_name}) of {self.model_name} comes only from timm's "
                f"forward_intermediates, which does not run {', '.join(repr(m) for m in modules)}; dissect them "
                "in separate runs")
        wanted = {name: self.stages[index].module for name, index in stages.items()}
        maps = self.hooked.forward(x, list(dict.fromkeys([*modules, *wanted.values()])))  # type: ignore[list-item]
        return {name: maps[name] for name in modules} | {name: maps[module] for name, module in wanted.items()}  # type: ignore[index]
