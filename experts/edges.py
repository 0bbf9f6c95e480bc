"""Classical edges: Canny on the grey image (weight-free)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images


class CannyEdges(Expert):
    """Canny edges (``kornia.filters.canny``) of the grey image.

    Returns ``(B, 1, H, W)`` float32 in [0, 1]: the gradient magnitude on the thin edges kept by
    non-maximum suppression and hysteresis, 0 elsewhere.

    Args:
        low_threshold, high_threshold: hysteresis thresholds on the gradient magnitude.
        kernel_size, sigma: the Gaussian blur applied first.
    """

    name: ClassVar[str] = "edge"
    kind: ClassVar[Literal["dense", "semantic"]] = "dense"
    channels: ClassVar[int] = 1

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        low_threshold: float = 0.1,
        high_threshold: float = 0.2,
        kernel_size: int = 5,
        sigma: float = 1.0,
    ) -> None:
        super().__init__(weights=weights, device=device)
        if not 0.0 <= low_threshold <= high_threshold:
            raise ValueError(
                f"expert {self.name!r}: need 0 <= low_threshold <= high_threshold, "
                f"got {low_threshold}, {high_threshold}"
            )
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.kernel_size = kernel_size
        self.sigma = sigma

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> edge strength ``(B, 1, H, W)`` in [0, 1]."""
        from kornia.color import rgb_to_grayscale
        from kornia.filters import canny

        check_images(self.name, images)
        grey = rgb_to_grayscale(images.to(self.device, torch.float32).clamp(0, 1))
        magnitude, edges = canny(
            grey,
            low_threshold=self.low_threshold,
            high_threshold=self.high_threshold,
            kernel_size=self.kernel_size,
            sigma=(self.sigma, self.sigma),
        )
        out = (magnitude * edges).clamp(0, 1).float()
        return self.check_output(LabelMap(out.to(images.device)), images)


@hookimpl
def register_experts(register) -> None:
    register(CannyEdges)
