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


def same_rows(ids: Tensor, mask: Tensor) -> Tensor:
    """``(B, T)`` token ids -> ``(B, B)`` bool: rows ``i`` and ``j`` hold the same text."""
    x = ids * mask
    return (x[:, None] == x[None]).all(-1) & (mask[:, None] == mask[None]).all(-1)


def draw_negatives(
    sim: Tensor | None,
    excluded: Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One negative sentence per image row, drawn within the batch.

    ``sim (B, B)``: retrieval similarity of row ``i``'s tag query to row ``j``'s sentence (the
    cosine the corpus builder ranked by); row ``j`` is drawn with probability
    ``softmax(sim[i] / temperature)`` over the rows not ``excluded[i]`` (``(B, B)`` bool: the
    same image, or the same sentence; the diagonal). ``sim=None``: uniform over them.
    Returns ``(index (B,), valid (B,))``; a row with nothing left to draw has no negative."""
    b = excluded.shape[0]
    allowed = ~excluded
    valid = allowed.any(1)
    logits = excluded.new_zeros((b, b), dtype=torch.float32)
    if sim is not None:
        logits = sim.float() / temperature
    logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(~valid[:, None], 0.0)
    index = torch.multinomial(logits.softmax(1), 1, generator=generator)[:, 0]
    return index, valid


@dataclass
class _Vocab:
    processor: Any
    mask_id: int


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
    - **image-sentence**: ITM by a binary head (``itm_head``, a linear layer on the first
      token of the image-grounded bidirectional encoding): positive = (image, its retrieved
      sentence), negative = (image, another row's sentence drawn within the batch, never a row
      of the same image or with the same sentence, :func:`draw_negatives`): by retrieval
      similarity (``negatives = "retrieval"``, hard negatives; needs the ``tag_emb``/``sent_emb``
      extras, else uniform) or uniformly (``"random"``, the paper's random pairs); plus MLM of
      the sentence (15%).

    After the warm-up (``warmup_steps`` optimizer steps: the training loop announces each with
    ``begin_step``, an explicit ``step=`` overrides it, and without either the objective counts
    its training forwards; or ``warmup_epochs`` when the batch passes ``epoch=``; the counters are
    buffers, so checkpoints and ``--resume`` keep them), the retrieved-pair losses (noun phrase, sentence MLM, ITM) of
    each sample are weighted by the model's own match probability ``softmax(itm)[match]`` of
    that pair, detached; the tag loss is not. An image's ITM terms (its positive and its
    negative) share its weight, so the weighting does not tilt the classifier. Weighted means
    divide by the number of terms, so a batch of poorly matched pairs contributes less. The parts
    log the weights' distribution every step (``w_min``, ``w_q25``, ``w_median``, ``w_q75``,
    ``w_max``: the match probabilities, which are the weights once ``weighted`` is 1).

    Not implemented: masked-region modelling. The paper masks detector region features (RoI
    pooled boxes) and regresses them or predicts their detector class; this vision side is a
    grid backbone (ViT patches / conv-stem grid) with no region proposals or per-region
    features, and masking grid cells would be masked-patch modelling, a different objective.
    The region side therefore enters only as the tag text conditioned on the whole image grid.

    Batch extras (``**extra``): ``tag_ids, tag_mask, tag_words, sent_ids, sent_mask,
    sent_words, np_mask`` from :func:`muvla_extras` / :func:`collate_pairs`; without them they
    are recovered from the plain ``encode(prompt=tags, target=sentence)`` batch
    (:func:`extras_from_encoded`), which is what :class:`MuVLAPairs` in the standard training
    loop gives. Optional: ``tag_emb, sent_emb (B, D)`` (the reader's retrieval embeddings),
    ``step: int``, ``epoch: int``.
    """

    name = "muvla"

    def __init__(
        self,
        *,
        width: int | None = None,
        label_smoothing: float = 0.0,
        mask_prob: float = 0.15,
        warmup_steps: int = 1000,
        warmup_epochs: int | None = None,
        negatives: str = "retrieval",
        negative_temperature: float = 0.05,
        tag_weight: float = 1.0,
        np_weight: float = 1.0,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        **_: object,
    ) -> None:
        super().__init__()
        if width is None:
            raise ValueError(
                "head 'muvla' needs the language width for its ITM head: the model builder "
                "passes width=config.language.width"
            )
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if negatives not in ("retrieval", "random"):
            raise ValueError(f"negatives must be 'retrieval' or 'random', got {negatives!r}")
        if negative_temperature <= 0:
            raise ValueError(f"negative_temperature must be > 0, got {negative_temperature}")
        self.negatives = negatives
        self.label_smoothing = label_smoothing
        self.mask_prob = mask_prob
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.negative_temperature = negative_temperature
        self.weights = {"tag": tag_weight, "np": np_weight, "itm": itm_weight, "mlm": mlm_weight}
        # the ITM classifier on the first token: logits [mismatch, match]
        self.itm_head = nn.Linear(width, 2)
        # training forwards so far: drives the warm-up when no optimizer step is known
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        # the optimizer step the training loop announced last (begin_step); -1 = none
        self.register_buffer("step", torch.full((), -1, dtype=torch.long))
        self._vocab: _Vocab | None = None

    def vocab(self, model) -> _Vocab:
        """The model's tokenizer (via ``Processor.from_config``) and its mask id, read once."""
        if self._vocab is None:
            from prismkit.core.processor import Processor

            proc = Processor.from_config(model.config)
            if proc.tokenizer.mask_token_id is None:
                raise ValueError("the muvla objective needs a tokenizer with a mask token")
            self._vocab = _Vocab(proc, proc.tokenizer.mask_token_id)
        return self._vocab

    def begin_step(self, step: int) -> None:
        """The training loop's optimizer step (once per step, before its forwards)."""
        self.step.fill_(step)

    def weighting_on(self, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether retrieved-pair losses are ITM-weighted at this optimizer step / epoch."""
        if epoch is not None and self.warmup_epochs is not None:
            return epoch >= self.warmup_epochs
        if step is None:
            step = int(self.step) if int(self.step) >= 0 else int(self.calls)
        return step >= self.warmup_steps

    def itm_logits(self, hidden: Tensor) -> Tensor:
        """``hidden (N, T, D)`` -> ``(N, 2)`` logits ``[mismatch, match]`` from the first token."""
        return self.itm_head(hidden[:, 0]).float()

    @torch.no_grad()
    def match_probability(
        self, model, images: Tensor, sent_ids: Tensor, sent_mask: Tensor, experts=None
    ) -> Tensor:
        """``(B,)`` ITM match probability of each (image, sentence) pair: the weight a
        retrieved pair gets after the warm-up. ``sent_ids``, ``sent_mask (B, T)``:
        ``[BOS] sentence [EOS]``."""
        vision = model.encode_image(images, experts)
        h, _ = model.language(sent_ids, vision, sent_mask, prefix_len=sent_mask.sum(1))
        return self.itm_logits(h).softmax(-1)[:, 1]

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
        step: int | None = None,
        epoch: int | None = None,
        tag_emb: Tensor | None = None,
        sent_emb: Tensor | None = None,
        **extra: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        v = self.vocab(model)
        if "sent_ids" not in extra:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            extra = extras_from_encoded(v.processor, input_ids, mask, labels)
        weighted = self.weighting_on(step, epoch)
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
        excluded = same_rows(t_ids, t_mask) | same_rows(s_ids, s_mask)  # same image or sentence
        sim = None
        if tag_emb is not None and sent_emb is not None:
            sim = tag_emb.float() @ sent_emb.float().T  # the builder's retrieval cosine
        hard = sim if self.negatives == "retrieval" else None
        neg, neg_valid = draw_negatives(hard, excluded, self.negative_temperature)
        neg_ids, neg_mask = s_ids[neg], s_mask[neg]
        ids = torch.cat([np_in, mlm_in, s_ids, neg_ids])
        mask = torch.cat([s_mask, s_mask, s_mask, neg_mask])
        h, _ = lang(ids, vision.repeat(4, 1, 1), mask, prefix_len=mask.sum(1))
        h_np, h_mlm, h_pos, h_neg = h.split(b)
        np_loss, np_has = per_row_ce(lang.logits, h_np, np_lab, self.label_smoothing)
        mlm_loss, mlm_has = per_row_ce(lang.logits, h_mlm, mlm_lab, self.label_smoothing)
        itm = self.itm_logits(torch.cat([h_pos, h_neg]))
        target = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(itm.device)
        itm_ce = F.cross_entropy(itm, target, reduction="none")
        match_p = itm[:b].softmax(-1)[:, 1].detach()
        w = match_p if weighted else torch.ones_like(match_p)
        # each image's ITM pair (its positive and its negative) is weighted as a whole, as the
        # paper weights L_IS: weighting positives alone tilts the head towards "mismatch", which
        # lowers the weights further (measured: the median weight fell from 0.59 to 0.04 in 40
        # steps after the warm-up)
        itm_loss = (w * (itm_ce[:b] + itm_ce[b:] * neg_valid)).sum() / (b + neg_valid.sum())

        parts = {
            "tag": _weighted_mean(tag_loss, tag_has, torch.ones_like(w)),
            "np": _weighted_mean(np_loss, np_has, w),
            "itm": itm_loss,
            "mlm": _weighted_mean(mlm_loss, mlm_has, w),
        }
        loss = sum(self.weights[k] * parts[k] for k in parts)
        logged = {k: p.detach() for k, p in parts.items()}
        with torch.no_grad():
            q = torch.quantile(match_p.float(), match_p.new_tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
            right = torch.cat([itm[:b].argmax(-1) == 1, (itm[b:].argmax(-1) == 0)[neg_valid]])
            logged |= dict(zip(("w_min", "w_q25", "w_median", "w_q75", "w_max"), q, strict=True))
            logged["match_prob"] = match_p.mean()
            logged["pair_weight"] = w.mean()
            logged["weighted"] = torch.tensor(float(weighted))
            logged["itm_acc"] = right.float().mean()
            logged["np_samples"] = np_has.sum().float()
            if sim is not None and bool(neg_valid.any()):
                logged["neg_sim"] = sim[torch.arange(b, device=sim.device), neg][neg_valid].mean()
                logged["pos_sim"] = sim.diagonal().mean()
        return loss, logged
