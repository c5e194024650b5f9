"""The stages of torchvision models: the return nodes torchvision's feature extraction uses, per family.

torchvision has no one list of stages; its detection and segmentation backbones and
``torchvision.models.feature_extraction.create_feature_extractor`` take module outputs by name. Per family:

- ResNet / ResNeXt / Wide ResNet: ``layer1`` … ``layer4`` (``resnet_fpn_backbone``);
- VGG, AlexNet: the ReLU that ends each convolution block, before its max-pool (VGG16's last is conv5_3's
  ReLU, ``features.29``, at 14×14 for 224 px — the layer the paper dissects, not the 7×7 pool after it);
- DenseNet: ``features.denseblock1`` … ``4`` (the last stage is the block, not the ``norm5`` BatchNorm);
- EfficientNet, MobileNet, ConvNeXt, Swin, SqueezeNet, MNASNet, GoogLeNet, ShuffleNet, MaxViT, RegNet: the last
  module of each resolution of the trunk, as timm's ``feature_info`` counts them; a trailing 1×1 head
  convolution that only widens the channels for the classifier (EfficientNet's and MobileNetV2's 1280-wide
  ``features`` end, ShuffleNet's ``conv5``, MNASNet's last conv) is no stage. MobileNetV3's last 1×1 conv
  is one: it is the last stage of torchvision's own ``_mobilenet_extractor`` and of timm's ``feature_info``;
- Inception v3: ``Conv2d_2b_3x3``, ``Conv2d_4a_3x3``, ``Mixed_5d``, ``Mixed_6e``, ``Mixed_7c`` (as timm);
- VisionTransformer: each encoder block, ``encoder.layers.encoder_layer_i`` (tokens as patch grids).

Module outputs are what ``create_feature_extractor`` returns for those nodes; the tests check it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...core.types import LayerInfo


def _children(model: nn.Module, path: str) -> list[str]:
    module = model.get_submodule(path)
    return [f"{path}.{name}" for name, _ in module.named_children()]


def resolution_ends(names: Sequence[str], infos: dict[str, LayerInfo]) -> list[str]:
    """Of modules run in sequence, the last of each run of equal map size (modules with no map are skipped)."""
    ends: list[str] = []
    last_size: tuple[int, ...] | None = None
    for name in names:
        info = infos.get(name)
        if info is None or not info.spatial:
            continue
        size = tuple(info.shape[1:])
        if size == last_size:
            ends[-1] = name
        else:
            ends.append(name)
            last_size = size
    return ends


def _relu_before_pools(model: nn.Module, path: str) -> list[str]:
    names = _children(model, path)
    modules = [model.get_submodule(n) for n in names]
    return [names[i - 1] for i, m in enumerate(modules)
            if isinstance(m, nn.MaxPool2d) and i > 0 and isinstance(modules[i - 1], nn.ReLU)]


def _is_head_conv(module: nn.Module) -> bool:
    """A 1×1 convolution block (conv, norm, activation) that widens the channels for the classifier."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return len(convs) == 1 and convs[0].kernel_size == (1, 1) and convs[0].out_channels > convs[0].in_channels


def stage_modules(model: nn.Module, infos: Sequence[LayerInfo]) -> list[str]:
    """The stage modules of a torchvision model, in order; empty for a model of no known family."""
    from torchvision import models as tv

    by_name = {i.name: i for i in infos}
    names: list[str] = []
    if isinstance(model, tv.ResNet):
        names = ["layer1", "layer2", "layer3", "layer4"]
    elif isinstance(model, tv.VGG | tv.AlexNet):
        names = _relu_before_pools(model, "features")
    elif isinstance(model, tv.DenseNet):
        names = [n for n in _children(model, "features") if n.split(".")[-1].startswith("denseblock")]
    elif isinstance(model, tv.VisionTransformer):
        names = _children(model, "encoder.layers")
    elif isinstance(model, tv.Inception3):
        names = ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"]
    elif isinstance(model, tv.EfficientNet | tv.MobileNetV2 | tv.MobileNetV3 | tv.ConvNeXt | tv.SwinTransformer |
                    tv.SqueezeNet):
        trunk = _children(model, "features")
        if not isinstance(model, tv.MobileNetV3) and _is_head_conv(model.get_submodule(trunk[-1])):
            trunk = trunk[:-1]
        names = resolution_ends(trunk, by_name)
    elif isinstance(model, tv.MNASNet):
        trunk = _children(model, "layers")
        # The trunk ends with the classifier's 1×1 conv, its BatchNorm and its ReLU.
        if len(trunk) > 3 and _is_head_conv(model.get_submodule(trunk[-3])):
            trunk = trunk[:-3]
        names = resolution_ends(trunk, by_name)
    elif isinstance(model, tv.GoogLeNet):
        trunk = [n for n, _ in model.named_children()]
        names = resolution_ends(trunk[: trunk.index("avgpool")], by_name)
    elif isinstance(model, tv.ShuffleNetV2):
        names = resolution_ends(["conv1", "maxpool", "stage2", "stage3", "stage4"], by_name)
    elif isinstance(model, tv.MaxVit):
        names = resolution_ends(["stem", *_children(model, "blocks")], by_name)
    elif isinstance(model, tv.RegNet):
        names = resolution_ends(["stem", *_children(model, "trunk_output")], by_name)
    return [n for n in names if n in by_name and by_name[n].spatial]
