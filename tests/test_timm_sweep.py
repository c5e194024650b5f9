"""One small model of each of 38 timm families, dissected with its default layer: the default is the last
stage, and its maps are timm's own ``forward_intermediates`` output, image for image and unit for unit.

Each model has seeded random weights and sees three generated 64 px images, and is built and probed for
64 px (``--input-size 64``) where it takes that; a model that takes only its own size gets the images
resized to it. Inception v3 needs 128 px images for its last stage to be more than 1×1.
The maps compared are the ones the run kept for its report (each unit's top images, raw), against
``forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")`` of the run's own model
(kept by a test plugin that registers the timm backend under another name), on the same images normalised
and resized by the test itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import netdissection
from netdissection import hookimpl
from netdissection.core.types import BackendOptions
from netdissection.plugins.backends.timm_backend import TimmBackend
from netdissection.plugins.datasets.broden import BrodenDataset
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.registry import build_host

IMAGES = 3
SIZE = 64

#: (family, the smallest model of the family, the size of its images, --input-size: None = the model's own)
FAMILIES = [
    ("resnet", "resnet10t", SIZE, SIZE),
    ("resnext", "resnext26ts", SIZE, SIZE),
    ("regnet", "regnetx_002", SIZE, SIZE),
    ("efficientnet", "efficientnet_b0", SIZE, SIZE),
    ("mobilenetv3", "mobilenetv3_small_050", SIZE, SIZE),
    ("convnext", "convnext_atto", SIZE, SIZE),
    ("convnextv2", "convnextv2_atto", SIZE, SIZE),
    ("vit", "vit_tiny_patch16_224", SIZE, SIZE),
    ("deit", "deit_tiny_distilled_patch16_224", SIZE, SIZE),  # two prefix tokens: class and distillation
    ("eva", "eva02_tiny_patch14_224", SIZE, SIZE),
    ("beit", "beit_base_patch16_224", SIZE, SIZE),
    ("cait", "cait_xxs24_224", SIZE, SIZE),
    ("swin", "swin_tiny_patch4_window7_224", SIZE, SIZE),
    ("swinv2", "swinv2_cr_tiny_ns_224", SIZE, SIZE),
    ("maxvit", "maxvit_pico_rw_256", SIZE, SIZE),
    ("coatnet", "coatnet_pico_rw_224", SIZE, SIZE),
    ("levit", "levit_128s", SIZE, 96),  # at 64 px its last stage is 1×1
    ("poolformer", "poolformer_s12", SIZE, SIZE),
    ("mixer", "mixer_s32_224", SIZE, SIZE),
    ("resmlp", "resmlp_12_224", SIZE, SIZE),
    ("pvt_v2", "pvt_v2_b0", SIZE, SIZE),
    ("edgenext", "edgenext_xx_small", SIZE, SIZE),
    ("fastvit", "fastvit_t8", SIZE, SIZE),
    ("ghostnet", "ghostnet_050", SIZE, SIZE),
    ("repvgg", "repvgg_a0", SIZE, SIZE),
    ("densenet", "densenet121", SIZE, SIZE),
    ("inception_v3", "inception_v3", 2 * SIZE, 2 * SIZE),
    ("xception", "xception41", SIZE, SIZE),
    ("nfnet", "nfnet_l0", SIZE, SIZE),
    ("crossvit", "crossvit_tiny_240", SIZE, None),  # built for 240 px only: the images are resized
    ("twins", "twins_svt_small", SIZE, SIZE),
    ("efficientformer", "efficientformer_l1", SIZE, None),  # likewise, at 224 px
    ("mobilevit", "mobilevit_xxs", SIZE, SIZE),
    ("hrnet", "hrnet_w18_small", SIZE, SIZE),
    ("dla", "dla46_c", SIZE, SIZE),
    ("rexnet", "rexnet_100", SIZE, SIZE),
    ("hgnet", "hgnetv2_b0", SIZE, SIZE),
    ("caformer", "caformer_s18", SIZE, SIZE),
]

_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def concept_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("sweep")
    sizes = {size for _, _, size, _ in FAMILIES}
    return {size: generate_concept_set(root / f"set{size}", images=IMAGES, image_size=size, seed=0) for size in sizes}


@pytest.fixture(scope="module")
def keep() -> KeepModels:
    return KeepModels()


@pytest.fixture(scope="module")
def host(keep: KeepModels):  # type: ignore[no-untyped-def]
    return build_host(extra_plugins=(keep,))


@pytest.fixture(scope="module", autouse=True)
def report_times() -> object:
    yield
    if _times:
        slowest = sorted(_times.items(), key=lambda t: -t[1])[:5]
        print(f"\ntimm sweep: {len(_times)} families in {sum(_times.values()):.1f} s of CPU; the most: "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in slowest))


class KeepModels:
    """A plugin registering the backend ``timm-kept``: timm's, with each backend kept for the test."""

    __name__ = "keep_models"

    def __init__(self) -> None:
        self.kept: list[TimmBackend] = []

    @hookimpl
    def dissect_register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        def make(model_ref: str, options: BackendOptions) -> TimmBackend:
            self.kept.append(TimmBackend(model_ref, options))
            return self.kept[-1]

        register("timm-kept", make, description="timm models, kept for the test")


def _reference_maps(model: torch.nn.Module, images: torch.Tensor, fixed: tuple[int, int] | None,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """timm's own last stage of ``model`` for uint8 ``images`` (N, H, W, 3)."""
    x = images.permute(0, 3, 1, 2).double().div(255)
    x = ((x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1))
         / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)).float()
    if fixed is not None and tuple(x.shape[-2:]) != fixed:
        x = F.interpolate(x, size=fixed, mode="bilinear", align_corners=False, antialias=True)
    with torch.inference_mode():
        return model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")[-1]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "model_name", "images", "size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_default_layer_is_timms_last_stage(family: str, model_name: str, images: int, size: int | None,
                                           concept_sets: dict[int, Path], host: object, keep: KeepModels) -> None:
    started = time.process_time()
    concept_set = concept_sets[images]
    options = {"input_size": (size, size)} if size else {}
    result = netdissection.dissect(model_name, backend="timm-kept", dataset=concept_set, batch_size=IMAGES, workers=0,
                                   top_k=IMAGES, host=host, backend_options=options)
    assert list(result.layers) == ["stage:-1"]  # the default layer
    layer = result.layers["stage:-1"]
    details = result.provenance["backend_details"]
    stages = details["stages"]
    assert details["stages_from"] == "forward_intermediates"
    assert layer.module == stages[f"stage:{len(stages) - 1}"]

    dataset = BrodenDataset(concept_set)
    pixels = torch.from_numpy(np.stack([dataset.load(i, labels=False).image for i in range(IMAGES)]))
    spec = result.provenance["input"]
    fixed = details["fixed_input_size"]
    reference = _reference_maps(keep.kept[-1].model, pixels, tuple(fixed) if fixed else None, spec["mean"],
                                spec["std"])
    assert layer.map_shape == tuple(reference.shape[1:])
    top = layer.top_images
    assert top is not None
    units = reference.shape[1]
    for unit in sorted({0, units // 3, units // 2, units - 1}):
        for rank in range(IMAGES):
            image = int(top.indices[unit, rank])
            expected = reference[image, unit]
            scale = float(expected.abs().max()) + 1e-6
            torch.testing.assert_close(torch.from_numpy(top.maps[unit, rank]), expected, rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m, u=unit, i=image: f"unit {u}, image {i}: {m}")
    _times[family] = time.process_time() - started


def test_the_sweep_covers_thirty_families() -> None:
    assert len({family for family, *_ in FAMILIES}) >= 30
    for _, model_name, *_ in FAMILIES:
        assert timm.is_model(model_name)
