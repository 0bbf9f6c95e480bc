"""BLIP's retrieval evaluation (``train_retrieval.evaluation`` and ``itm_eval``): ITC similarities
(no temperature), each query's top ``k_test`` candidates re-scored by ``ITM logit of 'match' +
ITC similarity``, every other entry -100; recall@1/5/10 both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

METRICS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "img_r1",
    "img_r5",
    "img_r10",
    "img_r_mean",
    "r_mean",
)


class Scorer(Protocol):
    """What retrieval needs of a model (``BlipModel`` has it; so does the frozen-backbone
    head's adapter). Pixels are what ``image_embeds`` takes; texts start with [CLS]."""

    def image_embeds(self, pixels: Tensor) -> Tensor: ...

    def image_feat(self, embeds: Tensor) -> Tensor: ...

    def text_feat(self, ids: Tensor, mask: Tensor) -> Tensor: ...

    def itm_logits(
        self, ids: Tensor, mask: Tensor, embeds: Tensor, swap: bool = True
    ) -> Tensor: ...


@dataclass
class RetrievalResult:
    # ITC similarity without temperature (N_img, N_txt)
    sims: Tensor
    # top-k candidates, descending (N_img, k) / (N_txt, k)
    i2t_topk_idx: Tensor
    t2i_topk_idx: Tensor
    # ITM logits of each query with its candidates (N, k, 2)
    i2t_itm_logits: Tensor
    t2i_itm_logits: Tensor
    # final scores, -100 outside the top k (N_img, N_txt) / (N_txt, N_img)
    score_i2t: Tensor
    score_t2i: Tensor
    # recall (percent): txt_r1 ... r_mean
    metrics: dict[str, float]


def itm_eval(
    scores_i2t: np.ndarray,
    scores_t2i: np.ndarray,
    txt2img: Sequence[int],
    img2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """BLIP's ``itm_eval``: an image's rank is that of its best-ranked own text; a text's rank is
    that of its image; ties broken as numpy's ``argsort(...)[::-1]`` breaks them."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    values = [*tr, tr_mean, *ir, ir_mean, (tr_mean + ir_mean) / 2]
    return dict(zip(METRICS, values, strict=True))


@torch.no_grad()
def evaluate(
    scorer: Scorer,
    pixels: Tensor,
    ids: Tensor,
    mask: Tensor,
    text_image: Sequence[int],
    k_test: int = 256,
    batch_size: int = 64,
) -> RetrievalResult:
    """``pixels (N_img, ...)`` as ``scorer.image_embeds`` takes them, texts ``ids, mask
    (N_txt, T)`` with [CLS] first; ``text_image[t]`` is the image of text ``t`` (several texts
    per image allowed). ``k_test`` is capped at the number of candidates."""
    n_img, n_txt = pixels.shape[0], ids.shape[0]
    if len(text_image) != n_txt:
        raise ValueError(f"{n_txt} texts but {len(text_image)} text->image indices")
    if min(text_image) < 0 or max(text_image) >= n_img:
        raise ValueError(f"text_image names images outside 0..{n_img - 1}")
    text_feat = torch.cat(
        [
            scorer.text_feat(ids[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, n_txt, batch_size)
        ]
    )
    embeds = torch.cat(
        [scorer.image_embeds(pixels[i : i + batch_size]) for i in range(0, n_img, batch_size)]
    )
    image_feat = scorer.image_feat(embeds)
    sims = image_feat @ text_feat.t()

    def rerank(sim: Tensor, image_of, text_of) -> tuple[Tensor, Tensor, Tensor]:
        k = min(k_test, sim.shape[1])
        top_sim, top_idx = sim.topk(k, dim=1)
        q = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)
        c = top_idx.reshape(-1)
        logits = []
        for i in range(0, q.numel(), batch_size):
            qi, ci = q[i : i + batch_size], c[i : i + batch_size]
            img, txt = image_of(qi, ci), text_of(qi, ci)
            logits.append(scorer.itm_logits(ids[txt], mask[txt], embeds[img]))
        logits_t = torch.cat(logits).view(sim.shape[0], k, 2)
        score = torch.full_like(sim, -100.0)
        score.scatter_(1, top_idx, logits_t[..., 1] + top_sim)
        return top_idx, logits_t, score

    i2t_idx, i2t_logits, score_i2t = rerank(sims, lambda q, c: q, lambda q, c: c)
    t2i_idx, t2i_logits, score_t2i = rerank(sims.t(), lambda q, c: c, lambda q, c: q)
    img2txt = [[t for t, i in enumerate(text_image) if i == n] for n in range(n_img)]
    if any(not texts for texts in img2txt):
        raise ValueError("every image needs at least one text: drop images without captions")
    metrics = itm_eval(
        score_i2t.float().cpu().numpy(), score_t2i.float().cpu().numpy(), list(text_image), img2txt
    )
    return RetrievalResult(
        sims, i2t_idx, t2i_idx, i2t_logits, t2i_logits, score_i2t, score_t2i, metrics
    )
