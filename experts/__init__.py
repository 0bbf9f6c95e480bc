"""Domain experts: plugins that turn images into label maps the model reads.

The contract (``Expert``, ``LabelMap``, ``WeightsStatus``) is defined in ``prismkit.core.expert``
and re-exported here, where plugin authors import it. Each built-in expert module is a plugin of
its own (``[project.entry-points.prismkit]``).
"""

from prismkit.core.expert import Expert, LabelMap, WeightsStatus

__all__ = ["Expert", "LabelMap", "WeightsStatus"]
