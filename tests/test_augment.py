"""The training augmentation moves the image and every expert map together."""

from __future__ import annotations

import pytest
import torch

from prismkit.core.model import SemanticInput
from prismkit.engine.augment import OPS, AugmentConfig, augment_batch, crop_box
from prismkit.engine.train import load_run_config, run_model_overrides


def _scene(b: int = 4, size: int = 96) -> torch.Tensor:
    """Images with a few flat coloured rectangles on black: labels can be read off the pixels."""
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(b, 3, size, size)
    for i in range(b):
        for _ in range(3):
            r0, c0 = torch.randint(0, size - 30, (2,), generator=g).tolist()
            h, w = torch.randint(15, 30, (2,), generator=g).tolist()
            img[i, :, r0 : r0 + h, c0 : c0 + w] = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
    return img


@pytest.mark.parametrize("seed", range(4))
def test_labels_stay_aligned_with_their_image(seed):
    """A semantic map (1 on the shapes) and a dense map (the image's brightness) at HALF the image
    resolution, augmented with the reference's recipe, still describe the augmented image."""
    torch.manual_seed(seed)
    images = _scene()
    fg = (images.amax(1) > 0.2).long()
    half = torch.nn.functional.interpolate(fg[:, None].float(), size=48, mode="nearest")[
        :, 0
    ].long()
    bright = torch.nn.functional.interpolate(images.mean(1, keepdim=True), size=48, mode="nearest")
    experts = {"seg": SemanticInput(half, torch.randn(2, 64), half), "depth": bright}
    cfg = AugmentConfig(
        crop_scale=(0.5, 1.0), hflip=0.5, randaugment_ops=2, randaugment_magnitude=5
    )
    out, maps = augment_batch(images, experts, 64, cfg)
    assert out.shape == (4, 3, 64, 64) and maps["seg"].index.shape == (4, 48, 48)
    assert torch.equal(maps["seg"].index, maps["seg"].instances)
    # what the augmented image shows, at the label maps' resolution
    seen = torch.nn.functional.interpolate(out, size=48, mode="area").amax(1) > 0.2
    agree = (seen == maps["seg"].index.bool()).float().mean()
    assert agree > 0.93, f"labels and image agree on only {agree:.2%} of the pixels"
    corr = torch.corrcoef(
        torch.stack(
            [torch.nn.functional.interpolate(out, size=48, mode="area").mean(1).flatten(),
             maps["depth"].flatten()]
        )
    )[0, 1]  # fmt: skip
    assert corr > 0.85


def test_crop_box_follows_torchvision_ranges():
    torch.manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_box(100, 100, (0.5, 1.0), (3 / 4, 4 / 3))
        assert top >= 0 and left >= 0 and top + h <= 1.0001 and left + w <= 1.0001
        assert 0.49 <= h * w <= 1.0001 and 0.74 <= w / h <= 1.34


def test_the_reference_op_list_and_magnitude():
    names = [op for op, *_ in OPS]
    assert names == [
        "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
        "autocontrast", "equalize", "brightness", "sharpness",
    ]  # fmt: skip
    assert not AugmentConfig().enabled


def test_shipped_recipes_load():
    pre = load_run_config("prismer_pretrain")
    assert pre.train.lr == 3e-4 and pre.train.warmup == 2000 and pre.train.min_lr == 1e-6
    assert pre.train.cosine_per_epoch and pre.train.decay_all and pre.data.augment.hflip == 0.5
    cap = load_run_config("prismer_caption")
    assert cap.train.lr == 5e-5 and cap.train.stage == "finetune"
    assert run_model_overrides("prismer_caption") == ["vision.image_size=480"]
    assert load_run_config("prismer_vqa").eval.top_k == 16


def test_reference_schedules():
    from prismkit.engine.train import TrainConfig, lr_at

    pre = TrainConfig(
        steps=100, warmup=10, lr=1.0, warmup_start_lr=0.0, min_lr=0.0, cosine_per_epoch=True
    )
    assert lr_at(0, pre, steps_per_epoch=50) == pytest.approx(0.1)
    assert lr_at(20, pre, steps_per_epoch=50) == 1.0  # epoch 0: the peak
    assert lr_at(60, pre, steps_per_epoch=50) == pytest.approx(0.5)  # epoch 1 of 2: cos(pi/2)
    fine = TrainConfig(steps=100, warmup=0, lr=1.0, min_lr=0.0)
    assert lr_at(50, fine) == pytest.approx(0.5) and lr_at(0, fine) == 1.0
