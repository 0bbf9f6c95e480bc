"""OCR detection with RapidOCR (PP-OCR ONNX models shipped inside the ``rapidocr`` package)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap, WeightsStatus
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images, to_uint8_hwc


class OCRDetection(Expert):
    """Text regions and their words from ``rapidocr.RapidOCR`` (needs ``rapidocr`` and
    ``onnxruntime``; runs on the CPU whatever ``device`` is).

    Each recognised word (or text line) is painted with its instance index, in RapidOCR's
    reading order. Output ``(B, H, W)`` int64; ``names[b] == ["background", word 1, word 2, ...]``;
    an image without text is all background.

    Args:
        text_score: minimum recognition score of a kept line, and of a kept word.
        granularity: ``"word"`` (one instance per word, like the reference's CharNet) or
            ``"line"`` (one per detected text line; faster).
    """

    name: ClassVar[str] = "ocr_detection"
    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        text_score: float = 0.5,
        granularity: Literal["word", "line"] = "word",
    ) -> None:
        super().__init__(weights=weights, device=device)
        if granularity not in ("word", "line"):
            raise ValueError(
                f"expert {self.name!r}: granularity must be 'word' or 'line', got {granularity!r}"
            )
        self.text_score = text_score
        self.granularity = granularity
        self._engine: Any = None

    def weights_status(self) -> WeightsStatus:
        try:
            import onnxruntime  # noqa: F401
            import rapidocr
        except ImportError as e:
            return WeightsStatus(
                False, f"pip install rapidocr onnxruntime (PP-OCR weights ship inside): {e}"
            )
        return WeightsStatus(True, f"rapidocr package ({rapidocr.__file__})")

    def load(self) -> None:
        if self._engine is not None:
            return
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ImportError(
                f"expert {self.name!r} needs `pip install rapidocr onnxruntime`"
            ) from e
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.text_score": self.text_score,
            # onnxruntime's own pool would take every core: use this process's share (label
            # workers split the machine's threads; two full pools on 2 cores spin against
            # each other)
            "EngineConfig.onnxruntime.intra_op_num_threads": torch.get_num_threads(),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        self._engine = RapidOCR(params=params)

    def _regions(self, bgr: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Run RapidOCR on an ``(H, W, 3)`` uint8 BGR image: ``[(text, (4, 2) xy polygon), ...]``."""
        if self.granularity == "line":
            result = self._engine(bgr)
            if result.txts is None or result.boxes is None:
                return []
            boxes = np.asarray(result.boxes, dtype=np.float64)
            return [(str(t), b) for t, b in zip(result.txts, boxes, strict=False)]
        result = self._engine(bgr, return_word_box=True)
        if result.txts is None:
            return []
        regions = []
        for line in result.word_results:
            for text, score, box in line:
                if box is None or not str(text).strip() or float(score) < self.text_score:
                    continue
                regions.append((str(text), np.asarray(box, dtype=np.float64)))
        return regions

    def _read(self, image: Tensor) -> tuple[np.ndarray, list[str]]:
        """``(3, H, W)`` in [0, 1] -> ``(H, W)`` int64 instance map and its texts."""
        from skimage.draw import polygon

        rgb = to_uint8_hwc(image)
        h, w = rgb.shape[:2]
        out = np.zeros((h, w), dtype=np.int64)
        texts: list[str] = []
        # RapidOCR reads 3-channel arrays as BGR (OpenCV order)
        for text, box in self._regions(np.ascontiguousarray(rgb[..., ::-1])):
            rr, cc = polygon(box[:, 1], box[:, 0], shape=(h, w))
            if len(rr) == 0:
                continue
            texts.append(text)
            out[rr, cc] = len(texts)
        return out, texts

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] -> text instance ids ``(B, H, W)`` int64."""
        check_images(self.name, images)
        self.load()
        maps, names = [], []
        for image in images:
            painted, texts = self._read(image)
            maps.append(torch.from_numpy(painted))
            names.append(["background", *texts])
        values = torch.stack(maps).to(images.device)
        return self.check_output(LabelMap(values, names), images)


@hookimpl
def register_experts(register) -> None:
    register(OCRDetection)
