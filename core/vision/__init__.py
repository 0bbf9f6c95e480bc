"""Vision side: image stems, the ViT backbone and the expert conv stems."""

from prismkit.core.vision.base import ImageStem, VisionBackbone
from prismkit.core.vision.expert_stem import ExpertStem

__all__ = ["ExpertStem", "ImageStem", "VisionBackbone"]
