"""Semantic segmentation: Mask2Former (COCO panoptic classes) and weight-free SLIC superpixels."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images
from prismkit.experts._hf import HFExpert, id2label_names


class Mask2FormerSegmentation(HFExpert):
    """Per-pixel classes from ``AutoModelForUniversalSegmentation`` (Mask2Former Swin-L on COCO
    panoptic's 133 classes by default, as in Prismer's reference).

    ``weights``: a hub id or a local checkpoint folder; default
    ``"facebook/mask2former-swin-large-coco-panoptic"``. Models that need text task inputs
    (OneFormer) are not supported. Semantic inference as in the reference: every pixel gets the
    class of the argmax of the per-class scores (``post_process_semantic_segmentation``), with
    the processor's padding cropped away before resizing to the input size.

    Output: ``(B, H, W)`` int64, index = class id + 1; ``names[b] == list(self.vocabulary)``,
    ``("background", *id2label)``, known once the weights are loaded.
    """

    name: ClassVar[str] = "seg_coco"
    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64
    stem_group: ClassVar[str | None] = "seg"
    label_table: ClassVar[str | None] = "coco"
    default_weights: ClassVar[str] = "facebook/mask2former-swin-large-coco-panoptic"
    auto_model: ClassVar[str] = "AutoModelForUniversalSegmentation"

    def _after_load(self) -> None:
        classes = id2label_names(self._model.config)
        if not classes:
            raise ValueError(f"expert {self.name!r}: {self.ref} has no id2label in its config")
        self.vocabulary = ("background", *classes)

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> class indices ``(B, H, W)`` int64."""
        b, h, w = check_images(self.name, images)
        batch = self.model_inputs(images)
        outputs = self.model(**batch)
        results = self.processor.post_process_semantic_segmentation(
            outputs, return_segmentation_scores=True
        )
        pixel_mask = batch.get("pixel_mask")
        padded = batch["pixel_values"].shape[-2:]
        maps = []
        for i, res in enumerate(results):
            scores = res.segmentation_scores  # (C, h', w') over the padded input
            if pixel_mask is not None:
                valid_h = int(pixel_mask[i].any(dim=1).sum())
                valid_w = int(pixel_mask[i].any(dim=0).sum())
                rows = max(1, round(scores.shape[-2] * valid_h / padded[0]))
                cols = max(1, round(scores.shape[-1] * valid_w / padded[1]))
                scores = scores[:, :rows, :cols]
            scores = F.interpolate(
                scores[None].float(), size=(h, w), mode="bilinear", align_corners=False
            )
            maps.append(scores[0].argmax(dim=0) + 1)
        values = torch.stack(maps).long().to(images.device)
        names = [list(self.vocabulary) for _ in range(b)]
        return self.check_output(LabelMap(values, names), images)


class SuperpixelSegmentation(Expert):
    """SLIC superpixels (``skimage.segmentation.slic``): each superpixel is one label.

    Weight-free and class-free: ``names[b] == ["background", "region 1", ..., "region K_b"]``
    (index 0 is never used). Output ``(B, H, W)`` int64.

    Args:
        n_segments: approximate number of superpixels per image.
        compactness: SLIC's colour/space trade-off (higher = more square regions).
        sigma: Gaussian smoothing before segmenting.
    """

    name: ClassVar[str] = "seg_superpixel"
    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        n_segments: int = 32,
        compactness: float = 10.0,
        sigma: float = 1.0,
    ) -> None:
        super().__init__(weights=weights, device=device)
        if n_segments < 1:
            raise ValueError(f"expert {self.name!r}: n_segments must be >= 1, got {n_segments}")
        self.n_segments = n_segments
        self.compactness = compactness
        self.sigma = sigma

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> region indices ``(B, H, W)`` int64 (1..K_b)."""
        from skimage.segmentation import slic

        check_images(self.name, images)
        arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        maps, names = [], []
        for img in arrays:
            labels = slic(
                img.astype(np.float64),
                n_segments=self.n_segments,
                compactness=self.compactness,
                sigma=self.sigma,
                start_label=1,
                channel_axis=-1,
            )
            # relabel to consecutive 1..K in raster order of first appearance
            _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
            order = np.argsort(np.argsort(first))
            labels = order[inverse].reshape(labels.shape) + 1
            maps.append(torch.from_numpy(labels.astype(np.int64)))
            names.append(["background", *(f"region {k}" for k in range(1, int(labels.max()) + 1))])
        values = torch.stack(maps).to(images.device)
        return self.check_output(LabelMap(values, names), images)


@hookimpl
def register_experts(register) -> None:
    register(Mask2FormerSegmentation)
    register(SuperpixelSegmentation)
