"""Transformer building blocks shared by the backbones, the resampler and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def squared_relu(x: Tensor) -> Tensor:
    return torch.relu(x).square()


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "squared_relu": squared_relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; available: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (the layout of CLIP, BERT and RoBERTa).

    ``forward(x (B, Tq, D), kv (B, Tk, Dkv) | None, mask (B, 1|H, Tq, Tk) bool | None, past
    (k, v) | None)``; ``past`` holds earlier keys/values ``(B, H, Tp, Dh)`` for cached decoding.
    """

    def __init__(
        self, width: int, heads: int, kv_width: int | None = None, bias: bool = True
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kv_width = kv_width or width
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(kv_width, width, bias=bias)
        self.v_proj = nn.Linear(kv_width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias)

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k_proj(kv)), self.split(self.v_proj(kv))

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        past: tuple[Tensor, Tensor] | None = None,
        fixed_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q = self.split(self.q_proj(x))
        if fixed_kv is not None:  # cached cross-attention keys/values
            k, v = fixed_kv
        else:
            k, v = self.project_kv(x if kv is None else kv)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None
        )
        b, h, t, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * d)), (k, v)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, width: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block with an adaptor between attention and MLP (Prismer's placement)."""

    def __init__(
        self, width: int, heads: int, mlp_hidden: int, act: str, eps: float, adaptor: nn.Module
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.adaptor = adaptor
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_hidden, act)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x (B, T, D)``; ``mask (B, 1, 1, T)`` bool hides padding keys (None: all visible)."""
        x = x + self.self_attn(self.layer_norm1(x), mask=mask)[0]
        x = self.adaptor(x)
        return x + self.mlp(self.layer_norm2(x))
