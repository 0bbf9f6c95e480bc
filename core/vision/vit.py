"""CLIP's vision transformer as Prismer runs it: no class token, positional embeddings shared by
RGB and every expert, an adaptor in every block; loaded from transformers' CLIP checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.config import VisionConfig
from prismkit.core.layers import LayerNorm32, VisionBlock
from prismkit.core.vision.base import ImageStem, VisionBackbone


def resize_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """``(g*g, D) -> (grid*grid, D)``: bicubic (``align_corners=False``) resize of a square grid
    of positional embeddings, as the reference's ``interpolate_pos_embed``; unchanged when equal."""
    old = math.isqrt(pos.shape[0])
    if old * old != pos.shape[0]:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not a square grid")
    if old == grid:
        return pos
    x = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)


def clip_vision_filter(
    state_dict: dict[str, Tensor], grid: int, with_patch_stem: bool
) -> dict[str, Tensor]:
    """Rename transformers ``CLIPVisionModel`` keys to ``ClipViT`` keys (pure function): the class
    token and its position are dropped (Prismer uses the patch tokens only) and the patch
    positions resized to ``grid``."""
    out = {}
    for key, value in state_dict.items():
        k = key.removeprefix("vision_model.")
        if k == "embeddings.patch_embedding.weight":
            if with_patch_stem:
                out["stem.proj.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["position_embedding"] = resize_pos_embed(value[1:], grid)
        elif k.startswith("encoder.layers."):
            out["layers." + k.removeprefix("encoder.layers.")] = value
        elif k.startswith(("pre_layrnorm.", "post_layernorm.")):
            out[k] = value
        elif k in ("embeddings.position_ids", "embeddings.class_embedding"):
            continue
        else:
            raise KeyError(f"unexpected key {key!r} in CLIP vision checkpoint")
    return out


class ClipViT(VisionBackbone):
    """Tokens from a stem grid through CLIP's ViT blocks.

    ``embed(images (B, 3, S, S)) -> (B, G*G, D)`` patch tokens with positions;
    ``positions(g) -> (g*g, D)`` the positional embedding resized to a g x g grid (experts);
    ``encode(tokens (B, T, D)) -> (B, T, D)``: ``ln_pre``, the blocks, ``ln_post``.
    """

    name = "clip_vit"

    def __init__(
        self, *, config: VisionConfig, stem: ImageStem, adaptor: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        c = config
        if c.image_size < c.patch_size:
            raise ValueError(
                f"vision.image_size {c.image_size} is smaller than vision.patch_size {c.patch_size}"
            )
        self.config = c
        # as the reference: a size that is not a multiple of the patch drops the last pixels
        # (480 px at patch 14 gives a 34 x 34 grid)
        self.grid = c.image_size // c.patch_size
        self.stem = stem
        self.position_embedding = nn.Parameter(torch.randn(self.grid**2, c.width) * c.width**-0.5)
        self.pre_layrnorm = LayerNorm32(c.width, eps=c.eps)
        hidden = int(c.width * c.mlp_ratio)
        self.layers = nn.ModuleList(
            VisionBlock(c.width, c.heads, hidden, c.act, c.eps, adaptor()) for _ in range(c.layers)
        )
        self.post_layernorm = LayerNorm32(c.width, eps=c.eps)
        self.gradient_checkpointing = False

    def positions(self, grid: int) -> Tensor:
        """The positional embedding for a ``grid x grid`` token map (bicubic when it differs)."""
        return resize_pos_embed(self.position_embedding, grid)

    def embed(self, images: Tensor, stem_features: Tensor | None = None) -> Tensor:
        """``(B, 3, S, S)`` normalised -> ``(B, G*G, D)``; ``stem_features``: the stem's
        :meth:`~ImageStem.frozen_features` of these images (cached), or None."""
        x = self.stem(images) if stem_features is None else self.stem(images, stem_features)
        if x.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"stem produced a {tuple(x.shape[-2:])} grid; expected {(self.grid, self.grid)}"
            )
        return x.flatten(2).transpose(1, 2) + self.position_embedding.to(x.dtype)

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
        own = self.state_dict()
        adaptors = {k for k in own if ".adaptor." in k}
        # a stem with its own weights (a CNN) loads them itself
        stem_keys = (
            set() if self.stem.weights_in_backbone else {k for k in own if k.startswith("stem.")}
        )
        missing = set(own) - set(state) - adaptors - stem_keys
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise KeyError(
                f"CLIP checkpoint {source!r} does not fit vision config: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise KeyError(
                    f"CLIP checkpoint {source!r}: {k} is {tuple(v.shape)}, the vision config needs {tuple(own[k].shape)}"
                )
        self.load_state_dict(state | {k: own[k] for k in adaptors | stem_keys}, strict=True)
