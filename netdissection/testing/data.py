"""Small, seeded things to test plugins on: a model, and a concept set in the Broden and folder formats."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: The layers of :func:`tiny_model`, in execution order; ``conv1``..``relu2`` have spatial maps.
TINY_LAYERS = ("conv1", "relu1", "conv2", "relu2", "pool", "flatten", "fc")


def tiny_model(seed: int = 0) -> nn.Module:
    """A small convolutional ``nn.Sequential`` with named layers and seeded weights (the global random
    state is left alone): ``conv1`` (8 units, stride 2), ``relu1``, ``conv2`` (16 units, stride 2),
    ``relu2``, then ``pool``, ``flatten``, ``fc`` (4 classes). On 32 px images ``conv2`` gives 8×8 maps."""
    from collections import OrderedDict

    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)),
            ("relu2", nn.ReLU()),
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(16, 4)),
        ]))
    return model.eval()


def write_tiny_broden(root: str | Path, *, images: int = 12, image_size: int = 32, seed: int = 0) -> Path:
    """A generated concept set in the Broden format at ``root`` (which must not hold anything yet): every
    category (object, part, color, material, scene, texture), pixel and image-level labels, labels at half
    the image size. Deterministic in ``(images, image_size, seed)``."""
    from ..plugins.datasets.generated import generate_concept_set

    return generate_concept_set(root, images=images, image_size=image_size, seed=seed)


def write_tiny_folder(root: str | Path, *, images: int = 12, image_size: int = 32, seed: int = 0) -> Path:
    """The same concept set as :func:`write_tiny_broden`, in the ``folder`` format (concepts.csv,
    samples.csv, PNG label maps) at ``root``."""
    import tempfile

    from ..plugins.datasets.broden import BrodenDataset
    from ..plugins.datasets.folder_writer import write_folder

    root = Path(root)
    with tempfile.TemporaryDirectory(dir=root.parent if root.parent.exists() else None) as tmp:
        broden = write_tiny_broden(Path(tmp) / "broden", images=images, image_size=image_size, seed=seed)
        return write_folder(BrodenDataset(broden), root)
