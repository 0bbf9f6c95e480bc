"""Monocular depth with a transformers depth-estimation model (default: DPT-Hybrid MiDaS)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.expert import LabelMap
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images
from prismkit.experts._hf import HFExpert


class DepthExpert(HFExpert):
    """Depth from ``AutoModelForDepthEstimation`` (DPT-Hybrid MiDaS, as in Prismer's reference).

    ``weights``: a hub id or a local checkpoint folder (config, weights, preprocessor config);
    default ``"Intel/dpt-hybrid-midas"``. The output is the model's raw prediction resized
    (bilinear) to the input size: ``(B, 1, H, W)`` float32. For MiDaS models that is relative
    inverse depth (larger = nearer), known only up to scale and shift.
    """

    name: ClassVar[str] = "depth"
    kind: ClassVar[Literal["dense", "semantic"]] = "dense"
    channels: ClassVar[int] = 1
    default_weights: ClassVar[str] = "Intel/dpt-hybrid-midas"
    auto_model: ClassVar[str] = "AutoModelForDepthEstimation"

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> depth ``(B, 1, H, W)`` float32."""
        _, h, w = check_images(self.name, images)
        depth = self.model(**self.model_inputs(images)).predicted_depth  # (B, h', w')
        if depth.ndim == 3:
            depth = depth.unsqueeze(1)
        depth = F.interpolate(depth.float(), size=(h, w), mode="bilinear", align_corners=False)
        return self.check_output(LabelMap(depth.to(images.device)), images)


@hookimpl
def register_experts(register) -> None:
    register(DepthExpert)
