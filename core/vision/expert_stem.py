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
"""

from __future__ import annotations

from torch import Tensor, nn

# (resize factor numerator, conv strides) per expert kind
RECIPES: dict[str, tuple[float, tuple[int, ...]]] = {
    "dense": (16.0, (2, 2, 2, 2)),
    "semantic": (4.0, (2, 2, 1, 1)),
}


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
        self.resize = nn.UpsamplingBilinear2d(scale_factor=numerator / patch_size)
        widths = (width // 8, width // 4, width // 2, width)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout, stride in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width, width, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expert stem expects {self.in_channels} channels, got {tuple(x.shape)}"
            )
        return self.proj(self.convs(self.resize(x)))
