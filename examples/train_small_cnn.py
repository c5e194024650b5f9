"""Train a small CNN on the generated concept set with two settings, a checkpoint per epoch, to watch
detectors emerge with ``dissect compare`` (the README's worked example).

The network is timm's ``test_resnet`` (a four-stage ResNet of 0.47 M parameters), so that ``dissect`` builds
the same architecture by name and loads each checkpoint into it. Its task is to tell the generated images
apart: the scene of a scene image (beach, street, room), the texture of a texture image (striped, dotted,
checkered), the object of a close-up (ball, box, pyramid, car) — ten classes read from the concept labels.
The head keeps timm's 1,000 outputs so that the checkpoints fit ``timm:test_resnet`` as ``dissect`` builds
it; only the first ten are trained.

Both settings start from the same initial weights (``epoch_0.pt``, saved before any step) and see the
same batches; they differ only in the setting (by default dropout 0 against dropout 0.5 before the
classifier). Training images come from the generator with another seed than the dissection set's::

    python examples/train_small_cnn.py --out small_cnn            # about 5 minutes on 2 CPU cores
    dissect compare timm:test_resnet --dataset small_cnn/concepts \\
        --checkpoints 'small_cnn/dropout_0/epoch_*.pt' --label dropout=0 \\
        --checkpoints 'small_cnn/dropout_0.5/epoch_*.pt' --label dropout=0.5 --out small_cnn/comparison
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from netdissection.core.types import Sample
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.generated import generate_concept_set

log = logging.getLogger("train_small_cnn")

ARCHITECTURE = "test_resnet"
#: The classes: scenes, textures, close-up objects (the generator's own names).
CLASSES = ("beach-s", "street-s", "room-s", "striped", "dotted", "checkered", "ball", "box", "pyramid", "car")
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as timm's test_resnet is fed by dissect
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Setting:
    """A training setting: its label (``dropout=0.5``), the folder its checkpoints go to, the dropout rate."""

    key: str
    value: str

    @property
    def label(self) -> str:
        return f"{self.key}={self.value}"

    @property
    def folder(self) -> str:
        return f"{self.key}_{self.value}"

    def model_options(self) -> dict[str, float]:
        if self.key == "dropout":
            return {"drop_rate": float(self.value)}
        raise ValueError(f"unknown setting {self.label}: this script varies dropout (dropout=0.5)")


def read_set(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a generated concept set as a normalised float batch, and its class (see CLASSES)."""
    data = BrodenDataset(root)
    names = {c.number: c.name for c in data.vocabulary.concepts}
    images, targets = [], []
    for i in range(len(data)):
        sample = data.load(i)
        images.append(np.asarray(sample.image))
        targets.append(CLASSES.index(class_of(sample, names)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last), torch.tensor(targets)


def class_of(sample: Sample, names: dict[int, str]) -> str:
    """A sample's class from its labels: its scene or texture (image-level labels), else its close-up object
    (the object label covering the most pixels)."""
    for number in sample.image_labels:
        if names.get(int(number)) in CLASSES:
            return names[int(number)]
    layers = np.asarray(sample.layers)
    numbers, counts = np.unique(layers[layers > 0], return_counts=True)
    objects = [(int(c), names[int(n)]) for n, c in zip(numbers, counts, strict=True) if names.get(int(n)) in CLASSES]
    if not objects:
        raise ValueError("a sample with neither a scene, a texture nor a close-up object")
    return max(objects)[1]


def train(setting: Setting, images: torch.Tensor, targets: torch.Tensor, out: Path, *, epochs: int, seed: int,
          batch_size: int = 32, lr: float = 0.05, held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Train one setting, saving ``epoch_0.pt`` (the initial weights) and ``epoch_E.pt`` after each epoch."""
    import timm

    folder = out / setting.folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the same initial weights for every setting
    model = timm.create_model(ARCHITECTURE, **setting.model_options()).to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    torch.save(model.state_dict(), folder / "epoch_0.pt")
    order = torch.Generator().manual_seed(seed)  # the same batches for every setting
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        correct = 0
        for batch in torch.randperm(len(images), generator=order).split(batch_size):
            x = images[batch]
            flip = torch.rand(len(batch), generator=order) < 0.5  # mirrored images keep their class
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            logits = model(x)
            loss = F.cross_entropy(logits, targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            correct += int((logits[:, : len(CLASSES)].argmax(1) == targets[batch]).sum())
        torch.save(model.state_dict(), folder / f"epoch_{epoch}.pt")
        shown = f"{setting.label} epoch {epoch}: train accuracy {correct / len(images):.2f}"
        if held_out is not None:
            shown += f", held-out accuracy {accuracy(model, *held_out):.2f}"
        log.info("%s (%.0f s)", shown, time.perf_counter() - started)
    return folder


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    predicted = torch.cat([model(x)[:, : len(CLASSES)].argmax(1) for x in images.split(64)])
    return float((predicted == targets).float().mean())


def parse_settings(text: str) -> list[Setting]:
    settings = []
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SystemExit(f"--settings takes KEY=VALUE items (dropout=0,dropout=0.5), not {item!r}")
        settings.append(Setting(key.strip(), value.strip()))
    return settings


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("small_cnn"), help="Where the sets and checkpoints go.")
    parser.add_argument("--settings", default="dropout=0,dropout=0.5",
                        help="The settings compared (default: %(default)s).")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=600, help="Generated training images (seed 1).")
    parser.add_argument("--dissect-images", type=int, default=300, help="Generated dissection images (seed 0).")
    parser.add_argument("--size", type=int, default=112, help="Image size in pixels (both sets).")
    parser.add_argument("--seed", type=int, default=0, help="Initial weights and batch order.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train_set, concepts = args.out / "train-set", args.out / "concepts"
    for root, images, seed in ((train_set, args.train_images, 1), (concepts, args.dissect_images, 0)):
        if not (root / "index.csv").exists():
            log.info("generating %d images of %d px in %s", images, args.size, root)
            generate_concept_set(root, images=images, image_size=args.size, seed=seed)
    images, targets = read_set(train_set)
    held_out = read_set(concepts)
    counts = np.bincount(targets.numpy(), minlength=len(CLASSES))
    log.info("%d training images, %s", len(images), ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts, strict=True)))
    folders = [train(setting, images, targets, args.out, epochs=args.epochs, seed=args.seed, held_out=held_out)
               for setting in parse_settings(args.settings)]
    series = " ".join(f"--checkpoints '{folder}/epoch_*.pt' --label {setting.label}"
                      for folder, setting in zip(folders, parse_settings(args.settings), strict=True))
    log.info("compare them:\n  dissect compare timm:%s --dataset %s %s --out %s", ARCHITECTURE, concepts, series,
             args.out / "comparison")
    return folders


if __name__ == "__main__":
    main()
