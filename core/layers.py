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


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (CLIP and Prismer do this, so
    mixed-precision training normalises in full precision); returns the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (CLIP, BERT and RoBERTa checkpoints;
    packed ``in_proj`` weights are split when converted).

    ``forward(x (B, Tq, D), kv (B, Tk, Dkv) | None, mask, past, fixed_kv)``: ``mask`` is additive
    ``(B, 1|H, Tq, Tk)`` float (0 where allowed, a large negative number elsewhere) or bool
    (True = allowed); ``past`` holds earlier keys/values ``(B, H, Tp, Dh)`` for cached decoding,
    ``fixed_kv`` cross-attention keys/values computed once.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        kv_width: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kv_width = kv_width or width
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(kv_width, width, bias=bias)
        self.v_proj = nn.Linear(kv_width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias)

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k_proj(kv)), self.split(self.v_proj(kv))

    def attend(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        fixed_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The attention output before ``out_proj`` ``(B, Tq, D)`` and the keys/values used."""
        q = self.split(self.q_proj(x))
        if fixed_kv is not None:
            k, v = fixed_kv
        else:
            k, v = self.project_kv(x if kv is None else kv)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
        if mask is not None and mask.dtype.is_floating_point and mask.dtype != q.dtype:
            # keep "hidden" finite in the compute dtype (a float32 minimum is -inf in bfloat16)
            mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d), (k, v)

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        fixed_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, kv_used = self.attend(x, kv, mask, past, fixed_kv)
        return self.out_proj(out), kv_used


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
    """CLIP's pre-LN block with Prismer's adaptor between attention and MLP:
    ``x + attn(ln_1(x))`` -> ``adaptor`` -> ``x + mlp(ln_2(x))``."""

    def __init__(
        self, width: int, heads: int, mlp_hidden: int, act: str, eps: float, adaptor: nn.Module
    ) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm32(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.adaptor = adaptor
        self.layer_norm2 = LayerNorm32(width, eps=eps)
        self.mlp = Mlp(width, mlp_hidden, act)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x (B, T, D)``; ``mask (B, 1, 1, T)`` bool hides padding keys (None: all visible)."""
        x = x + self.self_attn(self.layer_norm1(x), mask=mask)[0]
        x = self.adaptor(x)
        return x + self.mlp(self.layer_norm2(x))
