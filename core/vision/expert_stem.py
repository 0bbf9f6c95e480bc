"""Per-expert conv stems: a label map to tokens, as Prismer builds them.

The recipe follows the expert's contract (its ``kind``), never its name:

- dense maps (depth, normals, edges; 1 or 3 channels): bilinear resize by ``16 / patch``
  (``align_corners=True``), four 3x3 stride-2 conv + BN + ReLU at widths W/8, W/4, W/2, W, then a
  bias-free 1x1 conv W -> W;
- semantic maps (64-d label embeddings): bilinear resize by ``4 / patch``, 3x3 convs with strides
  2, 2, 1, 1 at the same widths, then the 1x1 conv.

An expert map of side S becomes an (S / patch) x (S / patch) grid either way (Prismer feeds its
experts at 224 px whatever the image size, so a 480 px model sees 30 x 30 RGB tokens and
14 x 14 tokens per expert).

Speed, same arithmetic: the convolutions run channels-last (oneDNN's faster layout on CPU and
GPU; the output grid is then already token-major); a resize by 1 (dense maps at patch 16) is
skipped (bilinear ``align_corners=True`` at the same size is the identity); a semantic map is
resized on its label grid (:meth:`ExpertStem.forward_labels`: four table rows per output pixel)
instead of tiling a 64-channel map at full resolution first; in eval mode each BatchNorm is
folded into its convolution (running statistics, so the same affine map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (resize factor numerator, conv strides) per expert kind
RECIPES: dict[str, tuple[float, tuple[int, ...]]] = {
    "dense": (16.0, (2, 2, 2, 2)),
    "semantic": (4.0, (2, 2, 1, 1)),
}


def bilinear_taps(size: int, out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source rows ``i0``, ``i1`` ``(out,)`` and weight ``l`` of ``i1`` that ``F.interpolate(...,
    mode="bilinear", align_corners=True)`` uses along one axis from ``size`` to ``out``."""
    scale = (size - 1) / (out - 1) if out > 1 else 0.0
    src = torch.arange(out, device=device, dtype=torch.float32) * scale
    i0 = src.long()  # src >= 0: truncation is floor
    i1 = (i0 + 1).clamp(max=size - 1)
    return i0, i1, src - i0


def resize_labels_bilinear(index: Tensor, table: Tensor, out: int) -> Tensor:
    """``F.interpolate(table[index] as (B, C, S, S), size=out, mode="bilinear",
    align_corners=True)`` computed on the label grid: each output pixel mixes the table rows of its
    four source pixels, so the ``(B, C, S, S)`` map is never built.

    Args:
        index: ``(B, S, S)`` int64 rows of ``table``.
        table: ``(K, C)`` label embeddings.
        out: output side.

    Returns:
        ``(B, C, out, out)`` in channels-last memory.
    """
    s = index.shape[-1]
    h0, h1, lh = bilinear_taps(s, out, index.device)
    w0, w1, lw = bilinear_taps(s, out, index.device)
    lh = lh.to(table.dtype)[:, None, None]
    lw = lw.to(table.dtype)[None, :, None]
    rows0, rows1 = index[:, h0], index[:, h1]

    def tap(rows: Tensor, cols: Tensor) -> Tensor:
        return F.embedding(rows[:, :, cols], table)  # (B, out, out, C)

    top = torch.lerp(tap(rows0, w0), tap(rows0, w1), lw)
    bottom = torch.lerp(tap(rows1, w0), tap(rows1, w1), lw)
    return torch.lerp(top, bottom, lh).permute(0, 3, 1, 2)


class ExpertStem(nn.Module):
    """``(B, C, S, S)`` label map -> ``(B, width, S / patch, S / patch)`` feature grid."""

    def __init__(self, *, in_channels: int, width: int, patch_size: int, kind: str) -> None:
        super().__init__()
        if kind not in RECIPES:
            raise ValueError(f"expert kind must be one of {sorted(RECIPES)}, got {kind!r}")
        if width % 8:
            raise ValueError(f"expert stems need a width divisible by 8, got {width}")
        numerator, strides = RECIPES[kind]
        self.in_channels = in_channels
        self.scale = numerator / patch_size
        self.resize = nn.UpsamplingBilinear2d(scale_factor=self.scale)
        widths = (width // 8, width // 4, width // 2, width)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout, stride in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width, width, 1, bias=False)
        # weights channels-last too: their gradients then come out in the layout the kernels use
        self.to(memory_format=torch.channels_last)

    def resized_side(self, side: int) -> int:
        """The map side after the bilinear resize (``UpsamplingBilinear2d``'s rounding)."""
        return math.floor(side * self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expert stem expects {self.in_channels} channels, got {tuple(x.shape)}"
            )
        if (self.resized_side(x.shape[-2]), self.resized_side(x.shape[-1])) != x.shape[-2:]:
            x = self.resize(x)  # a resize to the same size is the identity: skipped
        return self.features(x)

    def forward_labels(self, index: Tensor, table: Tensor) -> Tensor:
        """A semantic map given as ``index (B, S, S)`` rows of ``table (K, C)``: the same result
        as ``forward(table[index] as (B, C, S, S))`` without building that map."""
        if table.dim() != 2 or table.shape[1] != self.in_channels:
            raise ValueError(
                f"expert stem expects a (K, {self.in_channels}) table, got {tuple(table.shape)}"
            )
        side = self.resized_side(index.shape[-1])
        if side == index.shape[-1]:
            x = F.embedding(index, table).permute(0, 3, 1, 2)
        else:
            x = resize_labels_bilinear(index, table, side)
        return self.features(x)

    def features(self, x: Tensor) -> Tensor:
        """The conv stack on an already-resized map ``(B, C, S', S')``."""
        x = x.contiguous(memory_format=torch.channels_last)
        if self.training:
            return self.proj(self.convs(x))
        layers = list(self.convs)
        for conv, bn in zip(layers[0::3], layers[1::3], strict=True):
            w, b = fold_batch_norm(conv, bn)
            x = F.conv2d(x, w, b, conv.stride, conv.padding).relu_()
        return self.proj(x)


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution computing ``bn(conv(x))`` with ``bn``'s running
    statistics (eval mode); ``conv`` and ``bn`` themselves are unchanged."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    w = conv.weight * scale.to(conv.weight.dtype)[:, None, None, None]
    return w, shift.to(conv.weight.dtype)
