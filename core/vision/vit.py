"""CLIP-style vision transformer with adaptors, loaded from transformers' CLIP checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.config import VisionConfig
from prismkit.core.layers import VisionBlock
from prismkit.core.vision.base import ImageStem, VisionBackbone


def resize_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """``(1 + g*g, D) -> (1 + grid*grid, D)``: bicubic resize of the patch part, class slot kept."""
    old = int(math.isqrt(pos.shape[0] - 1))
    if old == grid:
        return pos
    patch = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)])


def clip_vision_filter(
    state_dict: dict[str, Tensor], grid: int, with_patch_stem: bool
) -> dict[str, Tensor]:
    """Rename transformers ``CLIPVisionModel`` keys to ``ClipViT`` keys (pure function)."""
    out = {}
    for key, value in state_dict.items():
        k = key.removeprefix("vision_model.")
        if k == "embeddings.patch_embedding.weight":
            if with_patch_stem:
                out["stem.proj.weight"] = value
        elif k == "embeddings.class_embedding":
            out["class_embedding"] = value
        elif k == "embeddings.position_embedding.weight":
            out["position_embedding"] = resize_pos_embed(value, grid)
        elif k.startswith("encoder.layers."):
            out["layers." + k.removeprefix("encoder.layers.")] = value
        elif k.startswith(("pre_layrnorm.", "post_layernorm.")):
            out[k] = value
        elif k == "embeddings.position_ids":
            continue
        else:
            raise KeyError(f"unexpected key {key!r} in CLIP vision checkpoint")
    return out


class ClipViT(VisionBackbone):
    """Tokens from a stem grid through CLIP's ViT blocks.

    ``embed(images (B, 3, H, W)) -> (B, 1 + N, D)`` (class token + patches, with positions);
    ``encode(tokens (B, T, D)) -> (B, T, D)``; ``patch_pos`` is shared with the expert stems.
    """

    name = "clip_vit"

    def __init__(
        self, *, config: VisionConfig, stem: ImageStem, adaptor: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(
                f"vision.image_size {c.image_size} is not a multiple of vision.patch_size {c.patch_size}"
            )
        self.config = c
        self.grid = c.image_size // c.patch_size
        self.stem = stem
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(1 + self.grid**2, c.width) * 0.02)
        self.pre_layrnorm = nn.LayerNorm(c.width, eps=c.eps)
        hidden = int(c.width * c.mlp_ratio)
        self.layers = nn.ModuleList(
            VisionBlock(c.width, c.heads, hidden, c.act, c.eps, adaptor()) for _ in range(c.layers)
        )
        self.post_layernorm = nn.LayerNorm(c.width, eps=c.eps)
        self.gradient_checkpointing = False

    @property
    def patch_pos(self) -> Tensor:
        return self.position_embedding[1:]

    def embed(self, images: Tensor) -> Tensor:
        x = self.stem(images)
        if x.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"stem produced a {tuple(x.shape[-2:])} grid; expected {(self.grid, self.grid)}"
            )
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding

    def encode(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """``tokens (B, T, D)`` -> ``(B, T, D)``; ``mask (B, T)`` 1 = token, 0 = padding (hidden
        as a key; None = every token real: the image alone)."""
        x = self.pre_layrnorm(tokens)
        keys = None if mask is None else mask.bool()[:, None, None, :]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, keys, use_reentrant=False)
            else:
                x = layer(x, keys)
        return self.post_layernorm(x)

    def load_pretrained(self, source: str) -> None:
        """Load a transformers CLIP (vision) checkpoint: hub id or local folder."""
        from transformers import CLIPVisionModel

        with weights.quiet_transformers():
            hf = CLIPVisionModel.from_pretrained(weights.resolve(source))
        state = clip_vision_filter(
            hf.state_dict(), self.grid, with_patch_stem=self.stem.weights_in_backbone
        )
        missing, unexpected = self.load_state_dict(state, strict=False)
        expected_missing = {k for k in self.state_dict() if ".adaptor." in k}
        # a stem with its own weights (a CNN) is loaded by the stem; torch does not report
        # BatchNorm's num_batches_tracked as missing, so its keys are allowed, not required
        stem_keys = (
            set()
            if self.stem.weights_in_backbone
            else {k for k in self.state_dict() if k.startswith("stem.")}
        )
        if unexpected or not expected_missing <= set(missing) <= expected_missing | stem_keys:
            raise KeyError(
                f"CLIP checkpoint {source!r} does not fit vision config: missing {sorted(set(missing) - expected_missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
