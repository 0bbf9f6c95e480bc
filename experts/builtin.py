"""The built-in experts, registered as a prismkit plugin (entry point ``experts``)."""

from __future__ import annotations

from collections.abc import Callable

from prismkit import hookimpl
from prismkit.experts.cam import CAMSuperpixelSegmentation, CAMTags
from prismkit.experts.depth import DepthExpert
from prismkit.experts.detection import ObjectDetection
from prismkit.experts.edges import CannyEdges
from prismkit.experts.hed import HEDEdges
from prismkit.experts.normals import NormalsExpert
from prismkit.experts.ocr import OCRDetection
from prismkit.experts.segmentation import Mask2FormerSegmentation, SuperpixelSegmentation

BUILTIN_EXPERTS: tuple[type, ...] = (
    DepthExpert,
    NormalsExpert,
    CannyEdges,
    HEDEdges,
    Mask2FormerSegmentation,
    SuperpixelSegmentation,
    CAMTags,
    CAMSuperpixelSegmentation,
    ObjectDetection,
    OCRDetection,
)


@hookimpl
def register_experts(register: Callable[[type], None]) -> None:
    """Register every built-in expert."""
    for cls in BUILTIN_EXPERTS:
        register(cls)
