"""The torchvision backend: any classification model of ``torchvision.models`` by name, or any
``torch.nn.Module`` handed to the Python API.

Layers: every module output, plus ``stage:N`` for the families whose stages torchvision's feature
extraction names (``torchvision_stages``); the default layer is ``stage:-1``, the last stage at its full
resolution (VGG16's conv5_3 ReLU at 14×14, not the pool after it). A model of another family keeps the
last layer with a spatial map as its default.

A name timm knows too (resnet18, efficientnet_b0, ...) is torchvision's here; the terminal says so once,
with the option that picks timm's, and an unknown layer of such a model names ``--backend timm`` when
timm's model of that name has the layer.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError, UnknownNameError
from ...core.files import atomic_write_text, cache_root
from ...core.hookspecs import hookimpl
from ...core.types import BackendOptions, InputSpec, LayerInfo

if TYPE_CHECKING:  # torch is imported when a backend is made, not when plugins are listed
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_SIZE = (224, 224)


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


class TorchvisionBackend:
    """A torchvision model (random weights unless ``--weights FILE`` or ``--pretrained``)."""

    name = "torchvision"
    runtimes = ("torch", "onnxruntime", "auto")  # --runtime (runtime.py)

    def __init__(self, model_ref: str | nn.Module, options: BackendOptions) -> None:
        import torch
        import torchvision
        from torch import nn

        from .layouts import fit_input
        from .runtime import RuntimeForward
        from .stages import stage_names
        from .torch_common import (
            INIT_SEED,
            HookedModel,
            build_with_weights,
            file_sha256,
            load_weights,
            seeded_init,
        )
        from .torchvision_stages import stage_modules

        self.options = options
        self.device = torch.device(options.device)
        self.weights_sha256: str | None = None
        self.random_init_seed: int | None = None  # set when the weights are the seeded random init
        self.named: str | None = None  # the torchvision name the model was built from
        if isinstance(model_ref, nn.Module):
            model, self.model_name = model_ref, type(model_ref).__name__
            if options.weights:
                load_weights(model, options.weights, self.model_name)
        else:
            self.model_name = self.named = str(model_ref)
            names = classification_models()
            if self.model_name not in names:
                raise UnknownNameError("torchvision model", self.model_name, names,
                                       hint="list them with: python -c 'import torchvision; "
                                            "print(torchvision.models.list_models())'")
            weights = "DEFAULT" if options.pretrained and not options.weights else None
            if options.weights:  # built around the file's weights, with no random init to overwrite
                model = build_with_weights(lambda: torchvision.models.get_model(self.model_name), lambda m: m,
                                           options.weights, self.model_name)
            else:
                try:
                    with seeded_init():
                        model = torchvision.models.get_model(self.model_name, weights=weights)
                    if weights is None:
                        self.random_init_seed = INIT_SEED
                except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
                    raise DissectionError(
                        f"cannot download the pretrained weights of {self.model_name} ({exc}); without a network, "
                        "pass a local file with --weights FILE") from None
        if options.weights:
            self.weights_sha256 = file_sha256(options.weights)
        # Each module's mode as it came (a caller's model may be in training), given back by ``release``.
        self._modes = {name: module.training for name, module in model.named_modules()}
        model.eval().to(self.device)
        # torchvision's VisionTransformer takes only its own image_size: batches are resized to it.
        size = model.image_size if isinstance(model, torchvision.models.VisionTransformer) else None
        self.fixed_size = (size, size) if size else None
        self.spatial_input = options.input_size or self.fixed_size or DEFAULT_SIZE
        probe = torch.zeros(1, 3, *self.spatial_input, device=self.device)
        self.hooked = HookedModel(model, fit_input(probe, self.fixed_size), model_name=self.model_name)
        self.model = model
        self.stages = stage_modules(model, self.hooked.infos)
        infos = {i.name: i for i in self.hooked.infos}
        self.aliases: dict[str, str] = {}
        for module, names in zip(self.stages, stage_names(len(self.stages)), strict=True):
            self.aliases.update(dict.fromkeys(names, module))
        self.infos = list(self.hooked.infos)
        for module, names in zip(self.stages, stage_names(len(self.stages)), strict=True):
            self.infos += [LayerInfo(name, infos[module].kind, infos[module].shape, module=module) for name in names]
        # channels_last runs convolutions about 1.4× faster on CPU; outputs are made contiguous below.
        if self.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
            self._channels_last = True
        else:
            self._channels_last = False
        self.runtime = RuntimeForward(model, self._forward, options.runtime, device=self.device,
                                      model_name=self.model_name)

    def layers(self) -> list[LayerInfo]:
        return list(self.infos)

    def adopt_runtime(self, decided: Mapping[str, Any], by: str) -> None:
        """``--runtime auto`` as another process decided it (see ``Backend.adopt_runtime``)."""
        self.runtime.adopt(decided, by)

    def release(self) -> None:
        """The run is over: the model gets its batch norms back (folded into its convolutions for the run) and
        each module its mode, so that a caller's model (one being trained, say) is as it was; its weights stay
        on the run's device, in channels-last memory."""
        self.runtime.release()
        modules = dict(self.model.named_modules())
        for name, training in self._modes.items():
            if name in modules:
                modules[name].training = training  # this module's own flag: each one is given back

    def select_layers(self, requested: Sequence[str] | None) -> list[str]:
        """The requested layers, checked (one-line errors); with none, the last stage."""
        from .stages import default_layer, select_layers

        return select_layers(self.infos, requested, self.model_name, stages=len(self.stages),
                             default=default_layer(self.infos, len(self.stages)),
                             list_command=f"dissect layers {self.model_name}", elsewhere=self._in_timm)

    def _in_timm(self, layer: str) -> str:
        """Where else an unknown layer exists: in timm's model of the same name (asked only on this error)."""
        if self.named is None or not timm_has_model(self.named):
            return ""
        import timm

        from .stages import stage_index
        from .torch_common import seeded_init

        try:
            with seeded_init():  # leaves the caller's random state as it was
                model = timm.create_model(self.named)
        except Exception:  # a timm model that cannot be built without options: no hint
            return ""
        index = stage_index(layer)
        stages = len(getattr(model, "feature_info", None) or [])
        if index is not None and -stages <= index < stages:
            return f"; timm's {self.named} has {layer} ({stages} stages): add --backend timm to use it"
        if index is None and layer in dict(model.named_modules()):
            return f"; timm's {self.named} has a layer {layer!r}: add --backend timm to use it"
        return ""

    def input_spec(self) -> InputSpec:
        default = InputSpec()
        return InputSpec(size=self.spatial_input, mean=self.options.mean or default.mean,
                         std=self.options.std or default.std, channel_order="BGR" if self.options.bgr else "RGB",
                         memory_format="channels_last" if self._channels_last else "contiguous")

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        from .layouts import fit_input

        self.select_layers(layers)
        images = fit_input(images, self.fixed_size)
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.runtime(images, layers)

    def _forward(self, images: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The maps of ``layers`` from one forward pass (traceable: the onnxruntime runtime exports it)."""
        modules = list(dict.fromkeys(self.aliases.get(layer, layer) for layer in layers))
        out = self.hooked.forward(images, modules)
        return {layer: out[self.aliases.get(layer, layer)].contiguous() for layer in layers}

    def describe(self) -> dict[str, Any]:
        import torch
        import torchvision

        from .stages import stage_names

        return {"backend": self.name, "model": self.model_name, "weights": self.options.weights,
                "weights_sha256": self.weights_sha256, "pretrained": self.options.pretrained,
                "random_init_seed": self.random_init_seed,
                "stages": {names[0]: m for m, names in zip(self.stages, stage_names(len(self.stages)), strict=True)},
                "torch": torch.__version__, "torchvision": torchvision.__version__, **self.runtime.describe(),
                **self._chunking()}

    def take_whole_batches(self, batch: int, chunk: int) -> bool:
        """Whole batches of up to ``batch`` images, ``chunk`` at a time in the early layers and at once in the late
        ones where that computes the same maps (``Backend.take_whole_batches``, :mod:`.late_layers`)."""
        self.hooked.run_in_chunks(batch, chunk)
        self.runtime.chunk = chunk
        return True

    def _chunking(self) -> dict[str, Any]:
        if self.hooked.chunk is None:
            return {}
        details: dict[str, Any] = {"forward_chunk": self.hooked.chunk}
        if self.runtime.chosen == "torch" and self.hooked.whole_batches_from:
            details["whole_batches_from"] = self.hooked.whole_batches_from
        return details


@hookimpl
def dissect_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register("torchvision", TorchvisionBackend,
             description="torchvision.models classification models by name, or a torch.nn.Module",
             accepts="a torchvision model name (resnet18, vgg16, ...) or an nn.Module (Python API)",
             names=classification_models, requires=("torch", "torchvision"))


# Normal priority, so that torchvision keeps its own names (resnet18 is a timm name too) against timm's
# trylast detection; third-party plugins, registered later, are still asked first.
@hookimpl
def dissect_detect_backend(model_ref: Any) -> str | None:
    torch = sys.modules.get("torch")  # a module instance implies torch is already imported
    if torch is not None and isinstance(model_ref, torch.nn.Module):
        return "torchvision"
    if isinstance(model_ref, str) and model_ref in classification_models():
        if timm_has_model(model_ref):
            # One line, short enough for an 80-column terminal after the log level.
            log.info("%s: torchvision's model; for timm's, add --backend timm", model_ref)
        return "torchvision"
    return None


def timm_has_model(name: str) -> bool:
    """Whether timm is installed and has a model of this name.

    Asked on every run of a torchvision model by name, for the one-line pointer to timm's: importing timm to
    answer takes half a second, so timm's model names are kept in the user's cache folder, one file per timm
    version (``timm-models-VERSION.txt``), and timm is imported only to write that file."""
    try:
        version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        return False
    path = cache_root() / f"timm-models-{version}.txt"
    try:
        return name in path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        pass
    try:
        import timm
    except ImportError:  # its metadata without the package: a broken install
        return False
    with contextlib.suppress(OSError):  # a read-only home only costs the import next time too
        atomic_write_text(path, "".join(f"{n}\n" for n in timm.list_models()))
    return bool(timm.is_model(name))

