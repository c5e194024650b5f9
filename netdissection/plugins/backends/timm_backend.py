"""The timm backend: any ``timm.list_models()`` architecture by name (``dissect convnext_tiny --backend timm``).

Weights: random by default (offline, reproducible under a seed); ``--weights FILE`` loads a local state
dict strictly; ``--pretrained`` uses timm's own pretrained loading, from the local HuggingFace / torch hub
caches when they hold the weights, and from the network otherwise — checked first with a short
connection timeout, so that an offline machine gets one clear error at once instead of timm's ~46 s
of retries.

Preprocessing (mean, std, input size) comes from ``timm.data.resolve_model_data_config``; the user's
``--mean/--std/--input-size/--bgr`` override it.

Layers (see ``timm_layers``): every module output, with token grids from the model, plus the stages
timm's own ``forward_intermediates`` returns as ``stage:0`` … ``stage:K-1`` and, counted from the end,
``stage:-K`` … ``stage:-1``. So ``--layer stage:-1`` is "the last stage" of any architecture, and it is
the default layer.

Input size: ViT-like models are created with ``dynamic_img_size=True`` where timm supports it, so they
take the dataset's images at their stored size (the position embedding is resampled, an identity at the
native size). ``--input-size H,W`` also sets the model's ``img_size`` where the architecture has one. A
model that still insists on a fixed size gets each batch resized bilinearly to it (``layouts.fit_input``);
the maps are upsampled to the label resolution afterwards anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError, MissingExtraError, UnknownNameError
from ...core.hookspecs import hookimpl
from ...core.types import BackendOptions, InputSpec, LayerInfo

if TYPE_CHECKING:  # torch and timm are imported when a backend is made, not when plugins are listed
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to the weights' host before calling the machine offline.
HUB_TIMEOUT_S = 3.0

#: Size arguments of ViT-like constructors; other architectures reject them by name (a TypeError).
_SIZE_ARGUMENTS = ("dynamic_img_pad", "dynamic_img_size", "img_size")
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise MissingExtraError("the timm backend", "timm", "timm") from None
    return timm


def timm_models() -> list[str]:
    """Every architecture name timm knows (``timm.list_models()``)."""
    return list(_import_timm().list_models())


def _check_name(timm: Any, name: str) -> None:
    if name.startswith(_HUB_PREFIXES):
        return  # a hub or local-dir reference: timm resolves it (and says what is wrong)
    if not timm.is_model(name):
        raise UnknownNameError("timm model", name, timm.list_models(),
                               hint="list them with: python -c 'import timm; print(timm.list_models())'")


# ---- pretrained weights without hanging offline -------------------------------------------------------------

def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def reachable(host: str, port: int = 443, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` (or the configured HTTPS proxy) opens within ``timeout``."""
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 3128
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hf_cache_dir() -> str | None:
    # Read at call time, so that HF_HUB_CACHE / HF_HOME set after huggingface_hub was imported count too.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _cached_weights(cfg: Any) -> str | None:
    """A local copy of a pretrained cfg's weights: HuggingFace hub cache, then torch hub's checkpoints."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = hub_id.partition("@")
            names = ["model.safetensors", getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"]
            for filename in names:
                found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = getattr(cfg, "url", None)
    if url:
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
        if path.is_file():
            return str(path)
    return None


def _pretrained_kwargs(timm: Any, name: str) -> dict[str, Any]:
    """``create_model`` arguments that load timm's pretrained weights for ``name``, from a local cache when
    one holds them; a one-line DissectionError when they would need a network that is not there."""
    if name.startswith(_HUB_PREFIXES):
        if name.startswith("local-dir:") or (not _offline() and reachable(_hub_host())):
            return {"pretrained": True}
        raise DissectionError(f"cannot load the pretrained weights of {name}: no network to reach the "
                              "HuggingFace hub; pass a local file with --weights FILE")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # an architecture with a tag it does not have
        raise DissectionError(f"timm model {name}: {exc}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise DissectionError(f"timm has no pretrained weights for {name}; pass a local file with --weights FILE")
    if cfg.file:
        return {"pretrained": True}
    cached = _cached_weights(cfg)
    if cached is not None:
        log.info("pretrained weights of %s from the local cache: %s", name, cached)
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": cached}}
    if cfg.hf_hub_id:
        if _offline():
            raise DissectionError(f"cannot load the pretrained weights of {name}: HF_HUB_OFFLINE is set and they "
                                  "are not in the local cache; pass a local file with --weights FILE")
        host = _hub_host()
    else:
        host = urllib.parse.urlparse(cfg.url).hostname or ""
    if not reachable(host):
        raise DissectionError(f"cannot download the pretrained weights of {name}: no network ({host} cannot be "
                              f"reached within {HUB_TIMEOUT_S:g} s); pass a local file with --weights FILE")
    return {"pretrained": True}


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urllib.parse.urlparse(endpoint).hostname or "huggingface.co"


# ---- the model ------------------------------------------------------------------------------------------------

def _create(timm: Any, name: str, options: BackendOptions) -> tuple[nn.Module, set[str]]:
    """``timm.create_model`` with the size arguments the architecture takes, and pretrained weights if asked;
    returns the model and the size arguments it took."""
    # dynamic_img_pad lets sizes that are no multiple of the patch through (the grid rounds up).
    kwargs: dict[str, Any] = {"dynamic_img_size": True, "dynamic_img_pad": True}
    if options.input_size:
        kwargs["img_size"] = tuple(options.input_size)
    if options.pretrained and not options.weights:
        kwargs.update(_pretrained_kwargs(timm, name))
    while True:
        try:
            return timm.create_model(name, **kwargs), {k for k in _SIZE_ARGUMENTS if k in kwargs}
        except TypeError as exc:
            dropped = next((k for k in _SIZE_ARGUMENTS if k in kwargs and f"'{k}'" in str(exc)), None)
            if dropped is None:
                raise
            log.debug("%s does not take %s", name, dropped)
            kwargs.pop(dropped)
        except (OSError, RuntimeError) as exc:  # a download or checkpoint that failed half way
            if not kwargs.get("pretrained"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DissectionError(f"cannot load the pretrained weights of {name} ({first}); pass a local "
                                  "file with --weights FILE") from None


def _fixed_input_sizes(model: nn.Module, data_config: dict[str, Any], built_for: tuple[int, int] | None) -> list[
        tuple[int, int] | None]:
    """The one input size the model accepts — None when it takes any size — or, when the model cannot say,
    the sizes it may accept, most likely first. ``built_for`` is the ``img_size`` the model was built with."""
    # Patch embeddings say it themselves, wherever they sit (``patch_embed``, Mixer's ``stem``, ...).
    embeds = [m for m in model.modules() if hasattr(m, "strict_img_size") and getattr(m, "img_size", None)]
    if embeds:
        strict = [m for m in embeds if m.strict_img_size]
        return [(int(strict[0].img_size[0]), int(strict[0].img_size[1])) if strict else None]
    if getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        size = data_config["input_size"]
        # Some constructors take img_size and build for it (LeViT, MaxViT); others take it and keep their
        # native size all the same (EfficientFormer): the probe pass tells.
        return list(dict.fromkeys([built_for, (int(size[1]), int(size[2]))] if built_for else [(size[1], size[2])]))
    return [None]


def _probe_input(size: tuple[int, int], device: Any) -> torch.Tensor:
    """A seeded random image: values that vary, so that no two different layers give equal maps by accident
    (an all-zero input makes many maps constant) and softmax outputs show what they are."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.randn(1, 3, *size).to(device)


class TimmBackend:
    """A timm model by name (random weights unless ``--weights FILE`` or ``--pretrained``)."""

    name = "timm"
    runtimes = ("torch", "onnxruntime", "auto")  # --runtime (runtime.py)

    def __init__(self, model_ref: str, options: BackendOptions) -> None:
        timm = _import_timm()
        import torch
        from timm.data import resolve_model_data_config
        from torch import nn

        from .layouts import fit_input
        from .runtime import RuntimeForward
        from .timm_layers import TimmLayers
        from .torch_common import build_with_weights, file_sha256, seeded_init

        self.options = options
        self.model_name = str(model_ref)
        self.device = torch.device(options.device)
        self.weights_sha256: str | None = None
        _check_name(timm, self.model_name)
        if options.weights:
            model, took = build_with_weights(lambda: _create(timm, self.model_name, options), lambda built: built[0],
                                             options.weights, self.model_name)
            self.weights_sha256 = file_sha256(options.weights)
        else:
            with seeded_init():
                model, took = _create(timm, self.model_name, options)
        model.eval().to(self.device)
        self.model = model
        self.data_config = resolve_model_data_config(model)
        built_for = tuple(options.input_size) if options.input_size and "img_size" in took else None
        default_size = tuple(int(s) for s in self.data_config["input_size"][1:])
        failure = ""
        for fixed in _fixed_input_sizes(model, self.data_config, built_for):  # type: ignore[arg-type]
            self.fixed_size = fixed
            self.spatial_input: tuple[int, int] = tuple(options.input_size or fixed or default_size)
            probe = _probe_input(self.spatial_input, self.device)
            try:
                self.layers_ = TimmLayers(model, fit_input(probe, fixed), self.model_name)
                break
            except (RuntimeError, AssertionError, ValueError) as exc:  # the model's own complaint about the size
                failure = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.debug("%s does not run at %s: %s", self.model_name, fixed or self.spatial_input, failure)
        else:
            h, w = options.input_size or self.fixed_size or self.spatial_input
            fix = "leave out --input-size" if options.input_size else "pass --input-size H,W"
            raise DissectionError(f"{self.model_name} does not run at {h}×{w} inputs ({failure}); {fix}")
        self.infos = self.layers_.infos()
        # channels_last runs convolutions about 1.4-1.9× faster on CPU; outputs are made contiguous.
        self._channels_last = self.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if self._channels_last:
            model.to(memory_format=torch.channels_last)
        self._warned_resize = False
        self.runtime = RuntimeForward(model, self._forward, options.runtime, device=self.device,
                                      model_name=self.model_name)

    def layers(self) -> list[LayerInfo]:
        return list(self.infos)

    def select_layers(self, requested: Sequence[str] | None) -> list[str]:
        """The requested layers, checked (one-line errors); with none, the last stage."""
        from .stages import default_layer, select_layers

        stages = len(self.layers_.stages)
        return select_layers(self.infos, requested, self.model_name, stages=stages,
                             default=default_layer(self.infos, stages),
                             list_command=f"dissect layers {self.model_name} --backend timm")

    def input_spec(self) -> InputSpec:
        mean = self.options.mean or tuple(float(v) for v in self.data_config["mean"])
        std = self.options.std or tuple(float(v) for v in self.data_config["std"])
        return InputSpec(size=self.spatial_input, mean=mean, std=std,  # type: ignore[arg-type]
                         channel_order="BGR" if self.options.bgr else "RGB",
                         memory_format="channels_last" if self._channels_last else "contiguous")

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        from .layouts import fit_input

        self.select_layers(layers)
        if self.fixed_size is not None and tuple(images.shape[-2:]) != self.fixed_size and not self._warned_resize:
            log.info("%s takes only %d×%d inputs: resizing %d×%d images to it", self.model_name,
                     *self.fixed_size, *images.shape[-2:])
            self._warned_resize = True
        images = fit_input(images, self.fixed_size)
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.runtime(images, layers)

    def adopt_runtime(self, decided: Mapping[str, Any], by: str) -> None:
        """``--runtime auto`` as another process decided it (see ``Backend.adopt_runtime``)."""
        self.runtime.adopt(decided, by)

    def _forward(self, images: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The maps of ``layers`` from one forward pass (traceable: the onnxruntime runtime exports it)."""
        out = self.layers_.forward(images, list(layers))
        return {layer: out[layer] for layer in layers}

    def describe(self) -> dict[str, Any]:
        import timm
        import torch

        from .stages import stage_names
        from .torch_common import INIT_SEED

        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        stages = self.layers_.stages
        return {"backend": self.name, "model": self.model_name, "weights": self.options.weights,
                "weights_sha256": self.weights_sha256, "pretrained": self.options.pretrained,
                "pretrained_source": cfg.get("hf_hub_id") or cfg.get("url") if self.options.pretrained else None,
                "random_init_seed": None if self.options.pretrained or self.options.weights else INIT_SEED,
                "stages": {names[0]: s.described for s, names in zip(stages, stage_names(len(stages)), strict=True)},
                "stages_from": "forward_intermediates" if self.layers_.intermediates else "feature_info hooks",
                "input_size": list(self.spatial_input),
                "fixed_input_size": list(self.fixed_size) if self.fixed_size else None,
                "timm": timm.__version__, "torch": torch.__version__, **self.runtime.describe()}


@hookimpl
def dissect_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register("timm", TimmBackend,
             description="timm (PyTorch Image Models) architectures by name",
             accepts="a timm.list_models() name (convnext_tiny, resnet50.a1_in1k, ...); layers: module "
                     "names or stage:N",
             names=timm_models, requires=("torch", "timm"))


@hookimpl(trylast=True)
def dissect_detect_backend(model_ref: Any) -> str | None:
    """Claim timm names — after every other plugin, so torchvision keeps its own names (resnet18, ...)."""
    if not isinstance(model_ref, str) or Path(model_ref).suffix.lower() == ".onnx":
        return None
    try:
        timm = _import_timm()
    except MissingExtraError:
        return None
    if model_ref.startswith(_HUB_PREFIXES) or timm.is_model(model_ref):
        return "timm"
    return None
