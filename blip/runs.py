"""Retrieval on a pairs file with a checkpoint (``prismkit retrieval``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from prismkit.blip.data import read_pairs
from prismkit.blip.retrieval import Scorer, evaluate
from prismkit.blip.text import pre_caption
from prismkit.core.host import PluginHost
from prismkit.core.processor import Processor, drop_empty


class _Normalising:
    """A BLIP model as a Scorer of images in [0, 1]."""

    def __init__(self, model) -> None:
        self.model = model

    def image_embeds(self, pixels: Tensor) -> Tensor:
        return self.model.image_embeds(self.model.normalize(pixels))

    def image_feat(self, embeds: Tensor) -> Tensor:
        return self.model.image_feat(embeds)

    def text_feat(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model.text_feat(ids, mask)

    def itm_logits(self, ids: Tensor, mask: Tensor, embeds: Tensor, swap: bool = True) -> Tensor:
        return self.model.itm_logits(ids, mask, embeds, swap)


def scorer_for(model, host: PluginHost) -> tuple[Scorer, int]:
    """The retrieval scorer of a checkpoint's model and its default ``k_test``."""
    from prismkit.blip.frozen import FrozenBLIPObjective, FrozenScorer
    from prismkit.blip.model import BlipModel

    if isinstance(model, BlipModel):
        if model.itm_head is None:
            raise ValueError(
                f"head {model.task!r} has no ITC/ITM heads: retrieval needs blip_retrieval or blip_pretrain"
            )
        return _Normalising(model), model.options.k_test
    if isinstance(getattr(model, "objective", None), FrozenBLIPObjective):
        return FrozenScorer(model, host), 256
    raise ValueError(
        f"retrieval needs a BLIP model (architecture 'blip') or head 'blip_frozen'; got {model.config.architecture!r} / {model.config.head!r}"
    )


@torch.no_grad()
def retrieval_on_pairs(
    checkpoint: str | Path,
    data: str | Path,
    host: PluginHost,
    k_test: int | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 64,
) -> tuple[dict[str, float], dict]:
    """R@1/5/10 of ``checkpoint`` on a pairs file: captions cleaned as BLIP's readers do
    (``pre_caption``, 30 words) and cut to 35 tokens; empty ones dropped and counted; pairs
    with the same ``image_id`` (default: the image path) share the image."""
    from prismkit.core.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, host).eval()
    scorer, default_k = scorer_for(model, host)
    processor = Processor.from_config(model.config)
    pairs = read_pairs(data, "test", image_root)
    captions = [pre_caption(q.caption, 30) for q in pairs]
    kept, empty = drop_empty(captions)
    images: dict[str, int] = {}
    paths: list[str] = []
    for i in kept:
        if pairs[i].image_id not in images:
            images[pairs[i].image_id] = len(paths)
            paths.append(pairs[i].image)
    text_image = [images[pairs[i].image_id] for i in kept]
    enc = processor.encode([""] * len(kept), [captions[i] for i in kept], truncate=True, max_len=35)
    device = next(model.parameters()).device
    pixels = processor.images(paths).to(device)
    k = k_test or default_k
    result = evaluate(
        scorer,
        pixels,
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        text_image,
        k_test=k,
        batch_size=batch_size,
    )
    info = {"images": len(paths), "texts": len(kept), "empty": empty, "k_test": k}
    return result.metrics, info
