"""The expert contract: what a domain-expert plugin declares and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class WeightsStatus:
    """Whether an expert's (or backbone's) weights can be had here, and where they come from."""

    available: bool
    # where the weights are read from, or where to put them when they are missing
    where: str


@dataclass
class LabelMap:
    """One expert's labels for a batch of images.

    values: dense experts: ``(B, C, H, W)`` float32; semantic experts: ``(B, H, W)`` int64
        indices into ``names`` (0 is background).
    names: semantic experts only: ``names[b][i]`` is the label name of index ``i`` in image ``b``
        (``names[b][0] == "background"``). Closed-vocabulary experts repeat their vocabulary.
    """

    values: Tensor
    names: list[list[str]] | None = None


class Expert(ABC):
    """A frozen domain expert. Subclass, set the class attributes, implement ``predict``.

    The constructor does no I/O: weights load lazily on the first ``predict`` (or ``load()``).
    """

    # unique name, used in configs, plugins.toml and the label store
    name: ClassVar[str]
    # "dense": continuous maps (depth, normals, edges); "semantic": label indices, text-embedded
    kind: ClassVar[Literal["dense", "semantic"]]
    # channels the model reads: dense maps' own channels; semantic experts' embedding size
    channels: ClassVar[int]
    # experts whose labels this one needs as input (normals from depth, say)
    requires: ClassVar[tuple[str, ...]] = ()
    # fixed label vocabulary of a closed-set semantic expert (index 0 = background)
    vocabulary: ClassVar[tuple[str, ...]] = ()
    # bump when outputs change: stored labels from other versions are recomputed
    version: ClassVar[str] = "1"
    # what ``tags(images)`` lists for each image, when the expert can name what it sees:
    # "detection" (the classes of detected objects) or "classifier" (image-level classes);
    # None: no tags. Consumers choose an expert by this capability, never by its name.
    tag_source: ClassVar[Literal["detection", "classifier"] | None] = None
    # experts with the same stem_group share one conv stem in the model (Prismer shares one
    # between its segmentation experts: "seg"); None = a stem of its own, named after the expert
    stem_group: ClassVar[str | None] = None
    # semantic experts whose label indices are object instances (1..K per image, 0 = background):
    # the model adds one of its learned instance embeddings per instance (Prismer's detection)
    instances: ClassVar[bool] = False
    # the label table of Prismer's label space its names come from ("coco", "ade", "detection");
    # None = free text (embedded by the text encoder, as OCR words are)
    label_table: ClassVar[str | None] = None

    def __init__(self, *, weights: str | None = None, device: str | torch.device = "cpu") -> None:
        self.weights = weights
        self.device = torch.device(device)

    def weights_status(self) -> WeightsStatus:
        """Whether this expert can run here. Weight-free experts are always available."""
        return WeightsStatus(True, "no weights needed")

    def load(self) -> None:  # noqa: B027 - optional hook: weight-free experts need nothing
        """Load weights (idempotent). Weight-free experts need nothing."""

    @abstractmethod
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """Label a batch.

        Args:
            images: ``(B, 3, H, W)`` float32 RGB in [0, 1] on ``self.device``.
            inputs: labels of the experts named in ``requires``, same batch.
        """

    def tags(self, images: Tensor) -> list[list[str]]:
        """``images (B, 3, H, W)`` RGB in [0, 1] -> each image's tags (class names, most
        confident first, each once). Implemented by experts that set ``tag_source``."""
        raise NotImplementedError(f"expert {self.name!r} lists no tags (tag_source is None)")

    @classmethod
    def check_output(cls, out: LabelMap, images: Tensor) -> LabelMap:
        """Shape/dtype check at the boundary where a plugin's output enters the core."""
        b, _, h, w = images.shape
        v = out.values
        if cls.kind == "dense":
            if v.dtype != torch.float32 or v.shape != (b, cls.channels, h, w):
                raise ValueError(
                    f"expert {cls.name!r} returned {tuple(v.shape)} {v.dtype}; expected ({b}, {cls.channels}, {h}, {w}) float32"
                )
        else:
            if v.dtype != torch.int64 or v.shape != (b, h, w):
                raise ValueError(
                    f"expert {cls.name!r} returned {tuple(v.shape)} {v.dtype}; expected ({b}, {h}, {w}) int64"
                )
            if out.names is None or len(out.names) != b:
                raise ValueError(
                    f"semantic expert {cls.name!r} must return one name list per image"
                )
            for i, names in enumerate(out.names):
                if int(v[i].max()) >= len(names):
                    raise ValueError(
                        f"expert {cls.name!r}: image {i} has label index {int(v[i].max())} but only {len(names)} names"
                    )
        return out
