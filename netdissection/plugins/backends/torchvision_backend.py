"""The torchvision backend: any classification model of ``torchvision.models`` by name, or any
``torch.nn.Module`` handed to the Python API."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...core.errors import DissectionError, UnknownNameError
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

    def __init__(self, model_ref: str | nn.Module, options: BackendOptions) -> None:
        import torch
        import torchvision
        from torch import nn

        from .layouts import fit_input
        from .torch_common import INIT_SEED, HookedModel, file_sha256, load_weights, seeded_init

        self.options = options
        self.device = torch.device(options.device)
        self.weights_sha256: str | None = None
        self.random_init_seed: int | None = None  # set when the weights are the seeded random init
        if isinstance(model_ref, nn.Module):
            model, self.model_name = model_ref, type(model_ref).__name__
        else:
            self.model_name = str(model_ref)
            names = classification_models()
            if self.model_name not in names:
                raise UnknownNameError("torchvision model", self.model_name, names,
                                       hint="list them with: python -c 'import torchvision; "
                                            "print(torchvision.models.list_models())'")
            weights = "DEFAULT" if options.pretrained and not options.weights else None
            try:
                with seeded_init():
                    model = torchvision.models.get_model(self.model_name, weights=weights)
                if weights is None and not options.weights:
                    self.random_init_seed = INIT_SEED
            except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
                raise DissectionError(
                    f"cannot download the pretrained weights of {self.model_name} ({exc}); without a network, "
                    "pass a local file with --weights FILE") from None
        if options.weights:
            load_weights(model, options.weights, self.model_name)
            self.weights_sha256 = file_sha256(options.weights)
        model.eval().to(self.device)
        # torchvision's VisionTransformer takes only its own image_size: batches are resized to it.
        size = model.image_size if isinstance(model, torchvision.models.VisionTransformer) else None
        self.fixed_size = (size, size) if size else None
        self.spatial_input = options.input_size or self.fixed_size or DEFAULT_SIZE
        probe = torch.zeros(1, 3, *self.spatial_input, device=self.device)
        self.hooked = HookedModel(model, fit_input(probe, self.fixed_size))
        self.model = model
        # channels_last runs convolutions about 1.4× faster on CPU; outputs are made contiguous below.
        if self.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
            self._channels_last = True
        else:
            self._channels_last = False

    def layers(self) -> list[LayerInfo]:
        return list(self.hooked.infos)

    def input_spec(self) -> InputSpec:
        default = InputSpec()
        return InputSpec(size=self.spatial_input, mean=self.options.mean or default.mean,
                         std=self.options.std or default.std, channel_order="BGR" if self.options.bgr else "RGB")

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        from .layouts import fit_input

        self.hooked.check(layers, self.model_name)
        images = fit_input(images, self.fixed_size)
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.hooked.forward(images, layers)
        return {k: v.contiguous() for k, v in out.items()}

    def describe(self) -> dict[str, Any]:
        import torch
        import torchvision

        return {"backend": self.name, "model": self.model_name, "weights": self.options.weights,
                "weights_sha256": self.weights_sha256, "pretrained": self.options.pretrained,
                "random_init_seed": self.random_init_seed,
                "torch": torch.__version__, "torchvision": torchvision.__version__}


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
        return "torchvision"
    return None
