"""Contracts for image stems and vision backbones."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn


class ImageStem(nn.Module, ABC):
    """RGB ``(B, 3, H, W)`` (normalised) -> feature grid ``(B, width, H/stride, W/stride)``."""

    # registered name
    name: ClassVar[str]
    # default weights source for the stem's own pretrained trunk, if it has one
    default_pretrained: ClassVar[str | None] = None
    # True when the stem's weights live in the vision backbone's checkpoint (a ViT's patch
    # embedding); False when the stem loads its own (a CNN trunk via ``load_pretrained``)
    weights_in_backbone: ClassVar[bool] = False
    # frozen unless the config says otherwise (``vision.stem_frozen``): a pretrained CNN trunk
    frozen_by_default: ClassVar[bool] = True

    def __init__(self, *, width: int, patch_size: int) -> None:
        super().__init__()
        self.width = width
        self.patch_size = patch_size

    def load_pretrained(self, source: str | None) -> None:
        """Load the stem's own trunk weights (a no-op for stems loaded with the backbone)."""

    def always_trainable(self) -> list[nn.Module]:
        """Parts that train even when the stem is frozen (a new projection on a frozen CNN)."""
        return []

    def frozen_features(self, images: Tensor) -> Tensor | None:
        """The output of the stem's frozen part (a pretrained CNN trunk) for ``images (B, 3, H,
        W)`` (normalised), which :meth:`forward` takes back as ``features``; None when no part of
        the stem is frozen. A pure function of each image while that part stays frozen (no
        dropout, BatchNorm in eval mode), so a training loop may cache it per image
        (``train.cache_frozen_features``)."""
        return None

    @abstractmethod
    def forward(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        """``(B, 3, H, W) -> (B, width, H/patch_size, W/patch_size)``; ``features`` (optional):
        :meth:`frozen_features` of the same images, used instead of recomputing them."""


class VisionBackbone(nn.Module):
    """Patch grid -> tokens: positional embedding, transformer blocks with adaptors."""

    name: ClassVar[str]
