"""Per-expert conv stems: a label map to tokens on the RGB patch grid."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ExpertStem(nn.Module):
    """``(B, C, H, W) -> (B, (H/p)*(W/p), width)``: 3x3 conv+BN+ReLU layers down to the patch
    grid (stride-2 until the next one would overshoot, then average pooling), then a 1x1 conv."""

    def __init__(self, *, in_channels: int, width: int, patch_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        downs = int(math.log2(patch_size))
        layers = [_conv_bn_relu(in_channels, hidden, 1)]
        layers += [_conv_bn_relu(hidden, hidden, 2) for _ in range(downs)]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.convs(x)
        if x.shape[-2:] != grid:
            x = F.adaptive_avg_pool2d(x, grid)
        return self.proj(x).flatten(2).transpose(1, 2)
