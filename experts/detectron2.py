"""Object detection through detectron2 (optional: loads only when detectron2 is importable).

detectron2 is not on PyPI; install it from source. Without it this plugin module fails to
import, and the plugin host lists it under "NOT LOADED" with the reason instead of crashing.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import detectron2  # noqa: F401 - the import is the availability check (see the module docstring)
import numpy as np
import torch
from torch import Tensor

from prismkit import hookimpl
from prismkit.core.expert import Expert, LabelMap, WeightsStatus
from prismkit.experts._common import check_images
from prismkit.experts.detection import paint_boxes, ranked_names

DEFAULT_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"


class Detectron2Detection(Expert):
    """Boxes from a detectron2 model-zoo detector (default Faster R-CNN R50-FPN, COCO), kept at
    ``threshold`` (0.5 as the reference), painted as instances (largest first) with class names.

    ``weights``: a local ``.pkl``/``.pth`` checkpoint, or None for the model zoo's URL (needs the
    network on first use; detectron2 caches it). ``config``: a model-zoo config name or a local YAML.
    """

    name: ClassVar[str] = "obj_detection_d2"
    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64
    tag_source: ClassVar[Literal["detection", "classifier"] | None] = "detection"

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        config: str = DEFAULT_CONFIG,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(weights=weights, device=device)
        self.config, self.threshold = config, threshold
        self._predictor = None
        self._classes: list[str] = []

    def weights_status(self) -> WeightsStatus:
        if self.weights:
            from pathlib import Path

            ok = Path(self.weights).is_file()
            return WeightsStatus(ok, self.weights if ok else f"{self.weights} does not exist")
        return WeightsStatus(
            True, f"detectron2 model zoo: {self.config} (downloaded and cached on first use)"
        )

    def load(self) -> None:
        if self._predictor is not None:
            return
        from detectron2 import model_zoo
        from detectron2.config import get_cfg
        from detectron2.data import MetadataCatalog
        from detectron2.engine import DefaultPredictor

        cfg = get_cfg()
        local = self.config.endswith(".yaml") and not self.config.startswith(("COCO", "LVIS"))
        cfg.merge_from_file(self.config if local else model_zoo.get_config_file(self.config))
        cfg.MODEL.WEIGHTS = self.weights or model_zoo.get_checkpoint_url(self.config)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = self.threshold
        cfg.MODEL.DEVICE = str(self.device)
        cfg.INPUT.FORMAT = "RGB"
        self._predictor = DefaultPredictor(cfg)
        self._classes = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes)

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> instance map ``(B, H, W)`` + per-image names."""
        b, h, w = check_images(self.name, images)
        self.load()
        maps, names = [], []
        for img in images:
            arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
            inst = self._predictor(np.ascontiguousarray(arr))["instances"].to("cpu")
            painted, order = paint_boxes(inst.pred_boxes.tensor, h, w)
            classes = inst.pred_classes.tolist()
            maps.append(painted)
            names.append(["background", *(self._classes[classes[i]] for i in order)])
        return self.check_output(LabelMap(torch.stack(maps), names), images)

    @torch.inference_mode()
    def tags(self, images: Tensor) -> list[list[str]]:
        """``images (B, 3, H, W)`` in [0, 1] -> each image's detected classes, most confident
        first, each once."""
        check_images(self.name, images)
        self.load()
        out = []
        for img in images:
            arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
            inst = self._predictor(np.ascontiguousarray(arr))["instances"].to("cpu")
            names = [self._classes[c] for c in inst.pred_classes.tolist()]
            out.append(ranked_names(names, inst.scores))
        return out


@hookimpl
def register_experts(register) -> None:
    register(Detectron2Detection)
