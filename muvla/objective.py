"""mu-VLA's objective: tag MLM, noun-phrase MLM, image-sentence ITM + MLM, ITM-score weighting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.heads import IGNORE
from prismkit.muvla.data import extras_from_encoded

INDEX_FORMAT = "prismkit.muvla_index/1"


# -- the objective -----------------------------------------------------------------------------
def mask_tokens(
    ids: Tensor, candidates: Tensor, prob: float, mask_id: int, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """BERT masking of ``ids (B, T)`` where ``candidates (B, T)`` is True: each candidate is
    chosen with ``prob`` (at least one per row that has one); chosen tokens become ``mask_id``
    (80%), a random token (10%) or stay (10%). Returns ``(masked ids, labels)``, labels -100 off
    the chosen positions."""
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & candidates
    empty = ~chosen.any(1) & candidates.any(1)
    if empty.any():  # one random candidate in rows that drew none
        pick = torch.rand(ids.shape, device=ids.device).masked_fill(~candidates, -1).argmax(1)
        chosen[empty, pick[empty]] = True
    labels = ids.masked_fill(~chosen, IGNORE)
    r = torch.rand(ids.shape, device=ids.device)
    masked = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
    noise = torch.randint_like(ids, vocab_size)
    masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), noise, masked)
    return masked, labels


def span_mask(ids: Tensor, spans: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Every token in ``spans (B, T)`` bool replaced by ``mask_id``; labels -100 elsewhere."""
    return ids.masked_fill(spans, mask_id), ids.masked_fill(~spans, IGNORE)


def per_row_ce(
    logits: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor, smoothing: float
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy per row over the labelled positions: ``hidden (B, T, D)``,
    ``labels (B, T)`` -> ``(loss (B,), has_target (B,) bool)``; the vocabulary projection runs
    only where a label is."""
    keep = labels != IGNORE
    count = keep.sum(1)
    per = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    if keep.any():
        ce = F.cross_entropy(
            logits(hidden[keep]).float(), labels[keep], reduction="none", label_smoothing=smoothing
        )
        per = per.index_add(0, keep.nonzero()[:, 0], ce) / count.clamp_min(1)
    return per, count > 0


def _weighted_mean(loss: Tensor, has: Tensor, weight: Tensor) -> Tensor:
    return (loss * weight * has).sum() / has.sum().clamp_min(1)


@dataclass
class _Vocab:
    processor: Any
    mask_id: int
    match_id: int
    mismatch_id: int


class MuVLAObjective(nn.Module):
    """mu-VLA's multi-granular alignment on a weakly aligned (retrieved) corpus.

    Per batch, with the image encoded once (``model.encode_image``):

    - **region/tag**: MLM of the tag sentence ``[BOS] tag1, tag2 [EOS]`` conditioned on the image:
      15% of the tag-word tokens are masked (BERT 80/10/10, at least one per sample) and predicted
      with bidirectional self-attention (``prefix_len`` = the sequence length) and
      cross-attention to the vision tokens.
    - **noun phrase**: the retrieved sentence with every tag-matching noun-phrase chunk masked
      (:func:`noun_phrase_spans`, an offline stop-word chunker), predicted the same way; samples
      without such a chunk add nothing.
    - **image-sentence**: ITM on the first token of the image-grounded bidirectional encoding:
      positive = (image, its retrieved sentence), negative = (image, another sample's sentence:
      the batch rolled by a random shift; pairs whose sentences are identical are dropped); plus
      MLM of the sentence (15%).

    The ITM "head" reads the existing MLM head at two verbaliser tokens of the tokenizer,
    ``logit(match) - logit(mismatch)`` = the LM-head logits of "yes" vs "no" at the first token:
    no new parameters, so it trains under ``PrismerModel.freeze`` (which unfreezes backbone parts
    only) and round-trips through checkpoints.

    After the warm-up (``warmup_steps`` training calls counted by the objective, or
    ``warmup_epochs`` when the batch passes ``epoch=`` through the extras), the retrieved-pair
    losses (noun phrase, sentence MLM, ITM positive) of each sample are weighted by the model's
    own match probability ``softmax(itm)[match]`` of that pair, detached; the tag loss and ITM
    negatives are not weighted. Weighted means divide by the number of samples, so a batch of
    poorly matched pairs contributes less.

    Not implemented: masked-region modelling. The paper masks detector region features (RoI
    pooled boxes) and regresses them or predicts their detector class; this vision side is a
    grid backbone (ViT patches / conv-stem grid) with no region proposals or per-region
    features, and masking grid cells would be masked-patch modelling, a different objective.
    The region side therefore enters only as the tag text conditioned on the whole image grid.

    Batch extras (``**extra``): ``tag_ids, tag_mask, tag_words, sent_ids, sent_mask,
    sent_words, np_mask`` from :func:`muvla_extras` / :func:`collate_pairs`; without them they
    are recovered from the plain ``encode(prompt=tags, target=sentence)`` batch
    (:func:`extras_from_encoded`), which is what :class:`MuVLAPairs` in the standard training
    loop gives. Optional ``epoch: int``.
    """

    name = "muvla"

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        mask_prob: float = 0.15,
        warmup_steps: int = 1000,
        warmup_epochs: int | None = None,
        tag_weight: float = 1.0,
        np_weight: float = 1.0,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        match_word: str = "yes",
        mismatch_word: str = "no",
        **_: object,
    ) -> None:
        super().__init__()
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.label_smoothing = label_smoothing
        self.mask_prob = mask_prob
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.weights = {"tag": tag_weight, "np": np_weight, "itm": itm_weight, "mlm": mlm_weight}
        self.words = (match_word, mismatch_word)
        # training calls so far (drives the warm-up); saved with the module's state
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._vocab: _Vocab | None = None

    def vocab(self, model) -> _Vocab:
        """The model's tokenizer (via ``Processor.from_config``) and the ids the objective needs,
        read once on first use."""
        if self._vocab is None:
            from prismkit.core.processor import Processor

            proc = Processor.from_config(model.config)
            tok = proc.tokenizer
            if tok.mask_token_id is None:
                raise ValueError("the muvla objective needs a tokenizer with a mask token")
            ids = [tok(w, add_special_tokens=False)["input_ids"] for w in self.words]
            if not all(ids) or ids[0][0] == ids[1][0]:
                raise ValueError(f"ITM words {self.words} do not map to distinct tokens")
            self._vocab = _Vocab(proc, tok.mask_token_id, ids[0][0], ids[1][0])
        return self._vocab

    def weighting_on(self, epoch: int | None) -> bool:
        """Whether retrieved-pair losses are ITM-weighted at this call."""
        if epoch is not None and self.warmup_epochs is not None:
            return epoch >= self.warmup_epochs
        return int(self.calls) >= self.warmup_steps

    def itm_logits(self, model, hidden: Tensor) -> Tensor:
        """``hidden (N, T, D)`` -> ``(N, 2)`` logits ``[mismatch, match]`` from the first token."""
        v = self._vocab
        return model.language.logits(hidden[:, 0])[:, [v.mismatch_id, v.match_id]].float()

    def forward(
        self,
        model,
        *,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor,
        experts=None,
        prefix_len: Tensor | None = None,
        epoch: int | None = None,
        **extra: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        v = self.vocab(model)
        if "sent_ids" not in extra:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            extra = extras_from_encoded(v.processor, input_ids, mask, labels)
        weighted = self.weighting_on(epoch)
        if self.training:
            self.calls += 1
        vocab_size = model.config.language.vocab_size
        lang = model.language
        vision = model.encode_image(images, experts)  # (B, Nv, D)
        b = vision.shape[0]

        # region/tag: MLM of the tag sentence, bidirectional, with vision
        t_ids, t_mask = extra["tag_ids"], extra["tag_mask"]
        t_in, t_lab = mask_tokens(t_ids, extra["tag_words"], self.mask_prob, v.mask_id, vocab_size)
        h, _ = lang(t_in, vision, t_mask, prefix_len=t_mask.sum(1))
        tag_loss, tag_has = per_row_ce(lang.logits, h, t_lab, self.label_smoothing)

        # sentence granularities in one pass of 4B: [NP-masked; MLM-masked; positive; negative]
        s_ids, s_mask = extra["sent_ids"], extra["sent_mask"]
        np_in, np_lab = span_mask(s_ids, extra["np_mask"], v.mask_id)
        mlm_in, mlm_lab = mask_tokens(
            s_ids, extra["sent_words"], self.mask_prob, v.mask_id, vocab_size
        )
        shift = int(torch.randint(1, b, ()).item()) if b > 1 else 0
        neg_ids, neg_mask = s_ids.roll(shift, 0), s_mask.roll(shift, 0)
        neg_valid = (
            ~((neg_ids == s_ids) | (s_mask == 0)).all(1) if b > 1 else s_ids.new_zeros(b).bool()
        )
        ids = torch.cat([np_in, mlm_in, s_ids, neg_ids])
        mask = torch.cat([s_mask, s_mask, s_mask, neg_mask])
        h, _ = lang(ids, vision.repeat(4, 1, 1), mask, prefix_len=mask.sum(1))
        h_np, h_mlm, h_pos, h_neg = h.split(b)
        np_loss, np_has = per_row_ce(lang.logits, h_np, np_lab, self.label_smoothing)
        mlm_loss, mlm_has = per_row_ce(lang.logits, h_mlm, mlm_lab, self.label_smoothing)
        itm = self.itm_logits(model, torch.cat([h_pos, h_neg]))
        target = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(itm.device)
        itm_ce = F.cross_entropy(itm, target, reduction="none")
        match_p = itm[:b].softmax(-1)[:, 1].detach()
        w = match_p if weighted else torch.ones_like(match_p)
        itm_loss = ((itm_ce[:b] * w).sum() + (itm_ce[b:] * neg_valid).sum()) / (b + neg_valid.sum())

        parts = {
            "tag": _weighted_mean(tag_loss, tag_has, torch.ones_like(w)),
            "np": _weighted_mean(np_loss, np_has, w),
            "itm": itm_loss,
            "mlm": _weighted_mean(mlm_loss, mlm_has, w),
        }
        loss = sum(self.weights[k] * parts[k] for k in parts)
        logged = {k: p.detach() for k, p in parts.items()}
        logged["match_prob"] = match_p.mean()
        logged["pair_weight"] = w.mean()
        logged["weighted"] = torch.tensor(float(weighted))
        logged["np_samples"] = np_has.sum().float()
        return loss, logged
