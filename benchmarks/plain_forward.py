"""The floor a dissection is measured against: a plain eager PyTorch forward pass over a Broden folder's images.

    python benchmarks/plain_forward.py --dataset SET --model resnet18 --weights resnet18.pt
    python benchmarks/plain_forward.py --dataset SET --model vit_small_patch16_224 --timm --weights vit.pt

What anyone would write, with none of netdissection's code: the image files listed in ``index.csv``, decoded
by Pillow in a plain ``torch.utils.data.DataLoader`` (worker processes, batches), torchvision's ``ToTensor``
and ``Normalize`` with the model's mean and std, the model in eval mode under ``torch.inference_mode()``, in
its default memory format. Prints one JSON line: images, seconds of the loop, images/s.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any


class ImageFiles:
    """The images of a Broden folder, as normalised tensors."""

    def __init__(self, root: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from torchvision import transforms

        with (root / "index.csv").open(newline="", encoding="utf-8") as f:
            self.paths = [root / "images" / row["image"] for row in csv.DictReader(f)]
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def build(model: str, use_timm: bool, weights: Path | None) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    import torch

    if use_timm:
        import timm

        net = timm.create_model(model, pretrained=False)
        mean, std = tuple(net.pretrained_cfg["mean"]), tuple(net.pretrained_cfg["std"])
    else:
        import torchvision

        net = torchvision.models.get_model(model)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval(), mean, std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--timm", action="store_true", help="a timm model (default: torchvision)")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader

    model, mean, std = build(args.model, args.timm, args.weights)
    images = ImageFiles(args.dataset, mean, std)
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=args.workers, shuffle=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            model(batch)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}))


if __name__ == "__main__":
    main()
