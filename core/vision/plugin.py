"""Built-in plugin: image stems and vision backbones."""

from prismkit.core.hookspecs import hookimpl
from prismkit.core.vision.stems import EfficientNetLite0Stem, PatchStem
from prismkit.core.vision.vit import ClipViT


@hookimpl
def register_image_stems(register) -> None:
    register(PatchStem)
    register(EfficientNetLite0Stem)


@hookimpl
def register_vision_backbones(register) -> None:
    register(ClipViT)
