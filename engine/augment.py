"""Prismer's training augmentation, applied to the RGB image and every expert map together.

As the reference's ``Transform`` and ``RandAugment`` (dataset/utils.py, dataset/randaugment.py):
a random resized crop (area scale [0.5, 1], aspect ratio [3/4, 4/3]) cut from the same relative
box of the image and of every label map; a horizontal flip (p = 0.5) of all of them; then
RandAugment with N ops of magnitude M drawn from Identity, ShearX/Y, TranslateX/Y, Rotate (the
geometric ops move the image (bilinear, black fill) and every map (nearest, background / 0 fill)
alike), AutoContrast, Equalize, Brightness and Sharpness (the image only).

Labels stay aligned with their image whatever their resolution: boxes, shears, rotations and
translations are expressed in relative coordinates. (The reference translates the 224 px label
maps by a fraction of the image's width in pixels, which misaligns them at 480 px; prismkit does
not copy that.) Randomness comes from torch's generator (reproducible, resumable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.model import ExpertInput, SemanticInput


@dataclass
class AugmentConfig:
    # random resized crop: range of the crop's area (fraction of the image); empty = no crop
    crop_scale: tuple[float, float] | None = None
    # random resized crop: range of the crop's aspect ratio (width / height)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # probability of a horizontal flip
    hflip: float = 0.0
    # RandAugment: ops per image (0 = off) and magnitude (0..10)
    randaugment_ops: int = 0
    randaugment_magnitude: int = 5
    # images are decoded at this side before the crop (0 = the model's image size)
    source_size: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.crop_scale or self.hflip or self.randaugment_ops)


# (op, min, max, geometric): the reference's augment_list()
OPS: tuple[tuple[str, float, float, bool], ...] = (
    ("identity", 0.0, 1.0, False),
    ("shear_x", 0.0, 0.3, True),
    ("shear_y", 0.0, 0.3, True),
    ("translate_x", 0.0, 0.33, True),
    ("translate_y", 0.0, 0.33, True),
    ("rotate", 0.0, 30.0, True),
    ("autocontrast", 0.0, 1.0, False),
    ("equalize", 0.0, 1.0, False),
    ("brightness", 0.1, 1.9, False),
    ("sharpness", 0.1, 1.9, False),
)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """``RandomResizedCrop.get_params``: a relative box ``(top, left, h, w)`` in [0, 1]."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, ()))
            j = int(torch.randint(0, width - w + 1, ()))
            return i / height, j / width, h / height, w / width
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) / 2 / height, (width - w) / 2 / width, h / height, w / width


def _crop(x: Tensor, box, size: tuple[int, int], mode: str) -> Tensor:
    """``x (N, C, H, W)``: cut the relative ``box`` and resize it to ``size``."""
    top, left, h, w = box
    hh, ww = x.shape[-2:]
    r0, c0 = int(round(top * hh)), int(round(left * ww))
    r1, c1 = max(r0 + 1, int(round((top + h) * hh))), max(c0 + 1, int(round((left + w) * ww)))
    x = x[..., r0:r1, c0:c1]
    if mode == "bicubic":
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(x.float(), size=size, mode="nearest-exact").to(x.dtype)


def _affine(x: Tensor, matrix: Tensor, mode: str) -> Tensor:
    """Resample ``x (N, C, H, W)`` so that output point p takes the input at ``matrix @ [p, 1]``,
    both in relative coordinates ([0, 1] across the image); outside the image: 0."""
    h, w = x.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1) @ matrix.T  # (H, W, 2) relative
    grid = (pts * 2 - 1)[None].expand(x.shape[0], -1, -1, -1).to(x.device)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear" if mode == "bilinear" else "nearest", align_corners=False
    )
    return out.to(x.dtype)


def _op_matrix(op: str, v: float) -> Tensor:
    """The reference's geometric ops as input-from-output affine maps (relative coordinates)."""
    m = torch.eye(3)[:2]
    if op == "shear_x":
        m[0, 1] = v
    elif op == "shear_y":
        m[1, 0] = v
    elif op == "translate_x":
        m[0, 2] = v
    elif op == "translate_y":
        m[1, 2] = v
    elif op == "rotate":  # PIL's rotate(v): counter-clockwise about the centre
        a = math.radians(v)
        c, s = math.cos(a), math.sin(a)
        m[:, :2] = torch.tensor([[c, -s], [s, c]])
        m[:, 2] = torch.tensor([0.5, 0.5]) - m[:, :2] @ torch.tensor([0.5, 0.5])
    return m


def _photometric(img: Tensor, op: str, v: float) -> Tensor:
    """``img (3, H, W)`` in [0, 1]."""
    import torchvision.transforms.v2.functional as TF

    if op == "autocontrast":
        return TF.autocontrast(img)
    if op == "equalize":
        return TF.equalize((img * 255).round().to(torch.uint8)).float() / 255
    if op == "brightness":
        return TF.adjust_brightness(img, v)
    if op == "sharpness":
        return TF.adjust_sharpness(img, v)
    return img


def _maps(experts: dict[str, ExpertInput]) -> list[tuple[str, str, Tensor]]:
    """Every spatial tensor of the expert inputs: (expert, field, (B, C, H, W))."""
    out = []
    for name, value in experts.items():
        if isinstance(value, SemanticInput):
            out.append((name, "index", value.index[:, None]))
            if value.instances is not None:
                out.append((name, "instances", value.instances[:, None]))
        else:
            out.append((name, "dense", value))
    return out


def _rebuild(experts: dict[str, ExpertInput], maps: dict[tuple[str, str], Tensor]):
    out: dict[str, ExpertInput] = {}
    for name, value in experts.items():
        if isinstance(value, SemanticInput):
            inst = maps.get((name, "instances"))
            out[name] = SemanticInput(
                maps[(name, "index")][:, 0], value.table, None if inst is None else inst[:, 0]
            )
        else:
            out[name] = maps[(name, "dense")]
    return out


def augment_batch(
    images: Tensor, experts: dict[str, ExpertInput], size: int, cfg: AugmentConfig
) -> tuple[Tensor, dict[str, ExpertInput]]:
    """``images (B, 3, H, W)`` in [0, 1] and their expert inputs -> the augmented images at
    ``size x size`` and expert inputs (each map keeps its own resolution), all moved alike."""
    b = images.shape[0]
    maps = _maps(experts)
    out_images, out_maps = [], {(n, f): [] for n, f, _ in maps}
    for i in range(b):
        img = images[i : i + 1]
        mine = {(n, f): t[i : i + 1] for n, f, t in maps}
        box = (0.0, 0.0, 1.0, 1.0)
        if cfg.crop_scale:
            box = crop_box(
                img.shape[-2], img.shape[-1], tuple(cfg.crop_scale), tuple(cfg.crop_ratio)
            )
        img = _crop(img, box, (size, size), "bicubic").clamp(0, 1)
        mine = {k: _crop(t, box, tuple(t.shape[-2:]), "nearest") for k, t in mine.items()}
        if cfg.hflip and float(torch.rand(())) < cfg.hflip:
            img = img.flip(-1)
            mine = {k: t.flip(-1) for k, t in mine.items()}
        for _ in range(cfg.randaugment_ops):
            op, lo, hi, geometric = OPS[int(torch.randint(0, len(OPS), ()))]
            v = cfg.randaugment_magnitude / 10 * (hi - lo) + lo
            if geometric:
                if float(torch.rand(())) > 0.5:
                    v = -v
                m = _op_matrix(op, v)
                img = _affine(img, m, "bilinear")
                mine = {k: _affine(t, m, "nearest") for k, t in mine.items()}
            else:
                img = _photometric(img[0], op, v)[None].clamp(0, 1)
        out_images.append(img)
        for k, t in mine.items():
            out_maps[k].append(t)
    return torch.cat(out_images), _rebuild(experts, {k: torch.cat(v) for k, v in out_maps.items()})
