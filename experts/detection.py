"""Object detection painted as an instance-id map (default: DETR ResNet-50, COCO)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from prismkit.core.expert import LabelMap
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images
from prismkit.experts._hf import HFExpert, id2label_names


def paint_boxes(boxes: Tensor, height: int, width: int) -> tuple[Tensor, list[int]]:
    """Paint ``(N, 4)`` xyxy pixel boxes into an ``(H, W)`` int64 map, largest box first so smaller
    boxes stay on top. Returns the map (box ``order[i]`` has index ``i + 1``, 0 = no box) and
    ``order``."""
    out = torch.zeros(height, width, dtype=torch.int64)
    if len(boxes) == 0:
        return out, []
    boxes = boxes.detach().float().cpu()
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    order = sorted(range(len(boxes)), key=lambda i: (-float(area[i]), i))
    for index, i in enumerate(order, start=1):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        c0 = min(max(math.floor(x0), 0), width - 1)
        r0 = min(max(math.floor(y0), 0), height - 1)
        c1 = max(min(math.ceil(x1), width), c0 + 1)
        r1 = max(min(math.ceil(y1), height), r0 + 1)
        out[r0:r1, c0:c1] = index
    return out, order


def ranked_names(names: list[str], scores: Tensor) -> list[str]:
    """Class names of detections, most confident first, each name once."""
    order = scores.detach().float().cpu().argsort(descending=True).tolist()
    return list(dict.fromkeys(names[i] for i in order))


class ObjectDetection(HFExpert):
    """Boxes from ``AutoModelForObjectDetection`` + ``post_process_object_detection``, kept when
    their score is at least ``threshold`` (0.5, as in the reference), painted as instances.

    ``weights``: a hub id or a local checkpoint folder; default ``"facebook/detr-resnet-50"``.
    The reference orders occluding boxes by depth; this expert orders them by area (larger boxes
    painted first, smaller on top) and needs no depth.

    Output: ``(B, H, W)`` int64 instance ids (0 = background);
    ``names[b] == ["background", class of instance 1, class of instance 2, ...]``.
    ``tags(images)``: the detected classes of each image, most confident first.
    """

    name: ClassVar[str] = "obj_detection"
    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64
    tag_source: ClassVar[Literal["detection", "classifier"] | None] = "detection"
    instances: ClassVar[bool] = True
    label_table: ClassVar[str | None] = "detection"
    default_weights: ClassVar[str] = "facebook/detr-resnet-50"
    auto_model: ClassVar[str] = "AutoModelForObjectDetection"

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        threshold: float = 0.5,
    ) -> None:
        super().__init__(weights=weights, device=device)
        self.threshold = threshold
        self._classes: tuple[str, ...] = ()

    def _after_load(self) -> None:
        self._classes = id2label_names(self._model.config)
        self.vocabulary = ("background", *self._classes)

    def _label(self, class_id: int) -> str:
        return (
            self._classes[class_id] if 0 <= class_id < len(self._classes) else f"class {class_id}"
        )

    def _detections(self, images: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image: ``boxes (N, 4)`` xyxy pixels, ``labels (N,)`` class ids, ``scores (N,)``,
        kept at ``threshold``."""
        b, h, w = check_images(self.name, images)
        outputs = self.model(**self.model_inputs(images))
        results = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(h, w)] * b
        )
        out = []
        for res in results:
            keep = res["scores"] >= self.threshold
            out.append((res["boxes"][keep], res["labels"][keep], res["scores"][keep]))
        return out

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> instance ids ``(B, H, W)`` int64."""
        h, w = images.shape[-2:]
        maps, names = [], []
        for boxes, labels, _ in self._detections(images):
            painted, order = paint_boxes(boxes, h, w)
            maps.append(painted)
            names.append(["background", *(self._label(int(labels[i])) for i in order)])
        values = torch.stack(maps).to(images.device)
        return self.check_output(LabelMap(values, names), images)

    @torch.inference_mode()
    def tags(self, images: Tensor) -> list[list[str]]:
        """``images (B, 3, H, W)`` in [0, 1] -> each image's detected classes at ``threshold``,
        most confident first, each once."""
        return [
            ranked_names([self._label(int(c)) for c in labels], scores)
            for _, labels, scores in self._detections(images)
        ]


@hookimpl
def register_experts(register) -> None:
    register(ObjectDetection)
