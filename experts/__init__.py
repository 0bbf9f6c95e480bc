"""Domain experts: plugins that turn images into label maps the model reads."""

from prismkit.experts.base import Expert, LabelMap, WeightsStatus

__all__ = ["Expert", "LabelMap", "WeightsStatus"]
