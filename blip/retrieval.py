"""BLIP's retrieval protocol: ITC top-k candidates re-ranked by ITM, R@1/5/10."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from prismkit.blip.objective import BLIPObjective


def rerank(
    sim: Tensor, k: int, itm: Callable[[Tensor, Tensor], Tensor], batch_size: int = 256
) -> Tensor:
    """BLIP's re-ranking: each query's top ``k`` candidates by ITC ``sim (Nq, Nc)`` get score
    ``itm(query_idx (M,), cand_idx (M,)) + sim``; the others -100. Returns ``(Nq, Nc)``."""
    k = min(k, sim.shape[1])
    top_sim, top_idx = sim.topk(k, dim=1)
    q_idx = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)
    c_idx = top_idx.reshape(-1)
    scores = torch.cat(
        [
            itm(q_idx[i : i + batch_size], c_idx[i : i + batch_size]).float()
            for i in range(0, q_idx.numel(), batch_size)
        ]
    )
    out = torch.full_like(sim, -100.0)
    out.scatter_(1, top_idx, scores.view(-1, k) + top_sim)
    return out


def recall_at_k(
    i2t: Tensor, t2i: Tensor, text_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall (%) from scores ``i2t (Ni, Nt)`` and ``t2i (Nt, Ni)``; ``text_image[j]`` is the
    image of text ``j`` (several texts per image allowed). An image counts as found at rank r
    when its best-ranked own text is within r (BLIP's ``itm_eval``)."""
    owner = torch.as_tensor(list(text_image), device=i2t.device)
    rank_of = i2t.argsort(1, descending=True).argsort(1)  # (Ni, Nt) rank of each text
    own = owner[None, :] == torch.arange(i2t.shape[0], device=i2t.device)[:, None]
    img_rank = rank_of.masked_fill(~own, i2t.shape[1]).amin(1)
    txt_rank = t2i.argsort(1, descending=True).argsort(1).gather(1, owner[:, None])[:, 0]
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float((img_rank < k).float().mean())
    for k in ks:
        out[f"img_r{k}"] = 100.0 * float((txt_rank < k).float().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def retrieval_eval(
    model,
    processor,
    images,
    texts: Sequence[str],
    k_test: int = 16,
    text_image: Sequence[int] | None = None,
    feeder: Callable | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Image-text retrieval R@1/5/10 both ways: ITC similarities, top ``k_test`` re-ranked by ITM.

    Args:
        model: a PrismerModel whose head is ``blip``.
        processor: its Processor.
        images: ``N_i`` image paths / PIL images / arrays, or a ``(N_i, 3, S, S)`` tensor.
        texts: ``N_t`` captions.
        text_image: image index of each text; default text ``j`` belongs to image ``j``.
        feeder: ``(pixels, ids) -> expert inputs``; default runs the enabled experts on the fly.
    """
    objective = model.objective
    if not isinstance(objective, BLIPObjective):
        raise ValueError(
            f"retrieval needs a model trained with head 'blip', not {model.config.head!r}"
        )
    text_image = list(range(len(texts))) if text_image is None else list(text_image)
    if len(text_image) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_image)} text->image indices")
    model.eval()
    device = next(model.parameters()).device
    pixels = images if isinstance(images, Tensor) else processor.images(images)
    if feeder is None:
        from prismkit.core.host import get_plugin_manager
        from prismkit.labels.feeder import ExpertFeeder

        feeder = ExpertFeeder(model, get_plugin_manager(), compute_missing=True)
    if max(text_image) >= pixels.shape[0] or min(text_image) < 0:
        raise ValueError(f"text_image names images outside 0..{pixels.shape[0] - 1}")
    vision, image_feat = [], []
    for i in range(0, pixels.shape[0], batch_size):
        px = pixels[i : i + batch_size].to(device)
        v = model.encode_image(px, feeder(px, [f"image-{n}" for n in range(i, i + px.shape[0])]))
        vision.append(v)
        image_feat.append(objective.image_features(v))
    vision_t, image_t = torch.cat(vision), torch.cat(image_feat)
    enc = processor.encode([""] * len(texts), list(texts))
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    text_t = torch.cat(
        [
            objective.text_features(model, ids[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, len(texts), batch_size)
        ]
    )
    sim = image_t @ text_t.t()  # (Ni, Nt)

    def itm(img: Tensor, txt: Tensor) -> Tensor:
        return objective.itm_logits(model, ids[txt], mask[txt], vision_t[img])[:, 1]

    i2t = rerank(sim, k_test, itm, batch_size)
    t2i = rerank(sim.t(), k_test, lambda t, i: itm(i, t), batch_size)
    return recall_at_k(i2t, t2i, text_image)
