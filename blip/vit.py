"""BLIP's vision transformer (``models/vit.py``, timm's ViT as BLIP ships it), registered as the
vision backbone ``blip_vit``.

Patch conv -> ``cat(cls_token, patches) + pos_embed`` -> pre-norm blocks (fused qkv with bias,
softmax(q k^T / sqrt(head_dim)) v, exact GELU MLP, LayerNorm eps 1e-6) -> final ``norm``.
Stochastic depth follows BLIP's linear rule (``drop_path`` at the last block; 0 for ViT-B,
0.1 for ViT-L in BLIP); there is no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prismkit.core.config import VisionConfig
from prismkit.core.vision import VisionBackbone


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (training only),
    scaling the kept ones by ``1 / (1 - p)`` (timm's ``DropPath``)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class ViTAttention(nn.Module):
    """``qkv`` Linear(W, 3W) with rows ``[q; k; v]``, heads contiguous; ``proj`` Linear(W, W)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (pre-norm)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ViTMlp(width, mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlipViT(VisionBackbone):
    """``forward(pixels (B, 3, S, S), normalised) -> image_embeds (B, 1 + (S/P)^2, W)``, token 0
    the CLS token. Built from a ``VisionConfig`` (``width``, ``layers``, ``heads``,
    ``patch_size``, ``image_size``, ``mlp_ratio``, ``eps``); ``act`` must be ``"gelu"``."""

    name = "blip_vit"

    def __init__(
        self,
        *,
        config: VisionConfig,
        drop_path: float = 0.0,
        checkpoint_layers: int = 0,
        **_: object,
    ) -> None:
        super().__init__()
        if config.act != "gelu":
            raise ValueError(
                f"vision backbone blip_vit uses exact GELU: set vision.act = 'gelu', got {config.act!r}"
            )
        if config.image_size % config.patch_size:
            raise ValueError(
                f"vision.image_size {config.image_size} is not a multiple of patch_size {config.patch_size}"
            )
        w, p = config.width, config.patch_size
        self.config = config
        self.grid = config.image_size // p
        self.patch_embed = nn.Conv2d(3, w, p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, w))
        n = config.layers
        rates = [drop_path * i / max(1, n - 1) for i in range(n)]  # linspace(0, drop_path, n)
        hidden = int(w * config.mlp_ratio)
        self.blocks = nn.ModuleList(
            ViTBlock(w, config.heads, hidden, config.eps, rates[i]) for i in range(config.layers)
        )
        self.norm = nn.LayerNorm(w, eps=config.eps)
        # BLIP's vit_grad_ckpt / vit_ckpt_layer: recompute the last ``checkpoint_layers`` blocks
        self.checkpoint_layers = checkpoint_layers
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) for linears, CLS and positions."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        """``(B, 3, S, S) -> (B, (S/P)^2, W)``: the patch conv, flattened row-major."""
        return self.patch_embed(pixels).flatten(2).transpose(1, 2)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_tokens(pixels)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        first_ckpt = len(self.blocks) - self.checkpoint_layers
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and i >= first_ckpt:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def interpolate_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """``(1, 1 + g^2, W)`` -> ``(1, 1 + grid^2, W)``: the CLS position kept, the patch grid
    resized bicubically (BLIP's ``interpolate_pos_embed``, used when a checkpoint pre-trained at
    224 px loads into a 384 px model)."""
    n = pos_embed.shape[1] - 1
    old = int(round(n**0.5))
    if old * old != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)
