"""Prismer's Experts Resampler: learned latents cross-attend to all expert tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prismkit.core.hookspecs import hookimpl
from prismkit.core.layers import Attention, LayerNorm32, Mlp


class ResamplerLayer(nn.Module):
    """``lat + attn(q=ln_1(lat), kv=[ln_1(lat); ln_2(tokens)])``, then ``lat + mlp(ln_ff(lat))``
    with a squared-ReLU MLP of width 4D (the reference's ``PerceiverAttentionBlock``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_latents = LayerNorm32(width)
        self.norm_tokens = LayerNorm32(width)
        self.attn = Attention(width, heads)
        self.norm_mlp = LayerNorm32(width)
        self.mlp = Mlp(width, 4 * width, act="squared_relu")

    def forward(self, latents: Tensor, tokens: Tensor) -> Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([q, self.norm_tokens(tokens)], dim=1)
        latents = latents + self.attn(q, kv)[0]
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """``(B, N, D) -> (B, L, D)``: N expert tokens (any N) to L learned latents. No final norm
    (the vision transformer's ``ln_pre`` follows)."""

    name = "perceiver"

    def __init__(self, *, width: int, latents: int = 64, layers: int = 4, heads: int = 8) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, width) * width**-0.5)
        self.layers = nn.ModuleList(ResamplerLayer(width, heads) for _ in range(layers))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.latents.shape[-1]:
            raise ValueError(
                f"resampler expects (B, N, {self.latents.shape[-1]}) tokens, got {tuple(tokens.shape)}"
            )
        x = self.latents.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, tokens)
        return x


@hookimpl
def register_resamplers(register) -> None:
    register(PerceiverResampler)
