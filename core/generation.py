"""Generation: beam search with transformers' exact semantics, and candidate-answer ranking.

:func:`generate_beams` reproduces ``transformers``' ``generate(num_beams=k)`` (``BeamSearchScorer``)
step for step, because published checkpoints are evaluated with it and their numbers depend on its
details: log-softmax over the vocabulary, then the logits processors (repetition penalty on the
log-probabilities, prompt tokens included; the minimum length sets the EOS log-prob to -inf without
renormalising), then the running beam score; top ``2k`` candidates over ``beams x vocab``; an EOS
candidate ranked below ``k`` is dropped, others close a hypothesis scored ``sum_logprobs /
len ** length_penalty`` (``len`` = tokens before EOS, prompt included); a batch row is done when it
holds ``k`` hypotheses and none of its running beams can beat the worst of them, tested as
``worst >= best_running / (cur_len + stop_offset) ** length_penalty`` (``stop_offset`` 1 from
transformers 4.27, 0 before: Prismer's checkpoints were evaluated with 4.27, BLIP's with 4.15); at
``max_length`` the open beams become hypotheses. Lengths count the prompt (``max_length=20`` with a
4-token prompt generates at most 16 tokens), as in transformers; ``BeamConfig.new_tokens`` counts
new tokens only.

The model is reached through a step function, so any decoder can use it (cached or not)::

    def step(input_ids, attention_mask, cache):   # -> (logits of the last position (N, V), cache)
        ...

The first call gets the prompts ``(N, P)`` and ``cache=None``; with ``use_cache`` later calls get
only the newest token ``(N, 1)`` (and the mask over every position so far) plus the cache returned
by the previous call, reordered by ``reorder(cache, beam_index)``; without it, every call gets the
whole sequence and ``cache=None`` (what the Prismer reference does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.layers import cast_weights_once

StepFn = Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]]
ReorderFn = Callable[[Any, Tensor], Any]


@dataclass
class BeamConfig:
    # beams kept per input
    beams: int = 3
    # longest returned sequence, prompt included (transformers' max_length)
    max_length: int = 20
    # EOS is forbidden while the sequence (prompt included) is shorter than this
    min_length: int = 8
    # hypothesis score = sum log p / length ** length_penalty (negative favours long answers)
    length_penalty: float = 1.0
    # > 1 discourages tokens already in the sequence (prompt included); 1 = off
    repetition_penalty: float = 1.0
    # stopping test offset: 1 = transformers >= 4.27 (Prismer), 0 = transformers 4.15 (BLIP)
    stop_offset: int = 1
    # an input is done as soon as it holds ``beams`` hypotheses (transformers' early_stopping)
    early_stopping: bool = False
    # count max_length / min_length in new tokens instead of total length
    new_tokens: bool = False
    # reuse keys/values of earlier positions (False re-runs the whole sequence every step)
    use_cache: bool = True


@dataclass
class BeamOutput:
    # (B, L) prompt + generated tokens (+ EOS when the best hypothesis ended), padded with pad
    sequences: Tensor
    # (B,) the returned hypotheses' scores
    scores: Tensor
    # prompt length P (generated tokens start at column P)
    prompt_length: int

    def new_tokens(self, eos: int, pad: int) -> list[list[int]]:
        """The generated tokens of each row, without prompt, EOS and padding."""
        out = []
        for row in self.sequences[:, self.prompt_length :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append([t for t in row if t != pad])
        return out


class _Hypotheses:
    """transformers' ``BeamHypotheses``: the best ``k`` finished sequences of one input."""

    def __init__(self, k: int, length_penalty: float, early_stopping: bool = False) -> None:
        self.k, self.length_penalty, self.early_stopping = k, length_penalty, early_stopping
        self.beams: list[tuple[float, Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (tokens.shape[-1] ** self.length_penalty)
        if len(self.beams) < self.k or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.k:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.k:
            return False
        if self.early_stopping:
            return True
        return self.worst >= best_sum_logprobs / cur_len**self.length_penalty


def _repetition_penalty(scores: Tensor, ids: Tensor, penalty: float) -> Tensor:
    picked = scores.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, ids, picked)


@torch.no_grad()
def generate_beams(
    step: StepFn,
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: BeamConfig,
    eos: int,
    pad: int,
    reorder: ReorderFn | None = None,
) -> BeamOutput:
    """Beam search from prompts ``input_ids (B, P)`` (``attention_mask`` 1 = token, 0 = padding;
    padding may sit anywhere, the model decides what it means). See the module docstring."""
    b, p = input_ids.shape
    k = cfg.beams
    max_length = cfg.max_length + (p if cfg.new_tokens else 0)
    min_length = cfg.min_length + (p if cfg.new_tokens else 0)
    if k < 1 or max_length <= p:
        raise ValueError(
            f"beam search needs beams >= 1 and max_length > prompt length {p}; got beams {k}, max_length {max_length}"
        )
    if cfg.use_cache and reorder is None:
        raise ValueError("use_cache needs a reorder(cache, beam_index) function")
    device = input_ids.device
    ids = input_ids.repeat_interleave(k, dim=0)
    mask = attention_mask.repeat_interleave(k, dim=0)
    beam_scores = torch.zeros(b, k, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(k, cfg.length_penalty, cfg.early_stopping) for _ in range(b)]
    done = [False] * b
    logits, cache = step(ids, mask, None)
    while True:
        cur_len = ids.shape[1]
        scores = F.log_softmax(logits.float(), dim=-1)
        if cfg.repetition_penalty != 1.0:
            scores = _repetition_penalty(scores, ids, cfg.repetition_penalty)
        if cur_len < min_length:
            scores[:, eos] = -float("inf")
        v = scores.shape[-1]
        flat = (scores + beam_scores[:, None]).view(b, k * v)
        top_scores, top_tokens = flat.topk(2 * k, dim=1, largest=True, sorted=True)
        origin, token = top_tokens // v, top_tokens % v
        next_scores = torch.zeros(b, k, device=device)
        next_tokens = torch.full((b, k), pad, dtype=torch.long, device=device)
        next_index = torch.zeros(b, k, dtype=torch.long, device=device)
        for row in range(b):
            if done[row]:
                continue  # finished rows carry pads at score 0 (transformers does the same)
            filled = 0
            for rank in range(2 * k):
                t, s = int(token[row, rank]), float(top_scores[row, rank])
                src = row * k + int(origin[row, rank])
                if t == eos:
                    if rank < k:
                        hyps[row].add(ids[src].clone(), s)
                else:
                    next_scores[row, filled] = top_scores[row, rank]
                    next_tokens[row, filled] = t
                    next_index[row, filled] = src
                    filled += 1
                if filled == k:
                    break
            best = float(top_scores[row].max())
            done[row] = hyps[row].is_done(best, cur_len + cfg.stop_offset)
        beam_scores = next_scores.view(-1)
        beam_index = next_index.view(-1)
        new = next_tokens.view(-1, 1)
        ids = torch.cat([ids[beam_index], new], dim=1)
        mask = torch.cat([mask[beam_index], torch.ones_like(new)], dim=1)
        if all(done) or ids.shape[1] >= max_length:
            break
        if cfg.use_cache:
            logits, cache = step(new, mask, reorder(cache, beam_index))
        else:
            logits, _ = step(ids, mask, None)
    for row in range(b):
        if not done[row]:  # open beams become hypotheses at max_length
            for j in range(k):
                hyps[row].add(ids[row * k + j], float(beam_scores[row * k + j]))
    best_seqs, best_scores = [], []
    for h in hyps:
        score, seq = sorted(h.beams, key=lambda x: x[0])[-1]
        best_seqs.append(seq)
        best_scores.append(score)
    lengths = [s.shape[-1] for s in best_seqs]
    width = min(max(lengths) + 1, max_length)
    out = torch.full((b, width), pad, dtype=torch.long, device=device)
    for row, seq in enumerate(best_seqs):
        out[row, : lengths[row]] = seq
        if lengths[row] < max_length:
            out[row, lengths[row]] = eos
    return BeamOutput(out, torch.tensor(best_scores, device=device), p)


def decoder_step(decoder, vision: Tensor, beams: int) -> tuple[StepFn, ReorderFn]:
    """The step and reorder functions of a prismkit ``TextDecoder`` attending to ``vision
    (B, N, D)``. transformers repeats ``encoder_hidden_states`` per beam; here the ``beams`` rows
    of one image share its cross-attention keys/values (the same numbers, projected once and
    never reordered: beams stay with their image). The first call's prompts are the same for
    every beam of an input: they run once per input and their logits and self-attention cache
    are repeated (the same numbers, ``beams`` times less work). The cross-attention keys/values
    are then stored heads-major (one copy; every later step's attention reads them contiguously,
    2.5% of BASE captioning, bench/README.md). Under autocast, each weight is cast once for the
    whole generation rather than at every step (:func:`prismkit.core.layers.cast_weights_once`)."""
    casts: dict = {}

    def step(ids: Tensor, mask: Tensor, cache: Any) -> tuple[Tensor, Any]:
        with cast_weights_once(casts):
            return _step(ids, mask, cache)

    def _step(ids: Tensor, mask: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if cache is not None:
            hidden, cache = decoder(ids, None, mask, cache=cache)
            return decoder.logits(hidden[:, -1]).float(), cache
        one_ids, one_mask = ids[::beams], mask[::beams]
        if (
            beams > 1
            and torch.equal(ids, one_ids.repeat_interleave(beams, 0))
            and torch.equal(mask, one_mask.repeat_interleave(beams, 0))
        ):
            hidden, cache = decoder(one_ids, vision, one_mask)
            index = torch.arange(one_ids.shape[0], device=ids.device).repeat_interleave(beams)
            logits, cache = decoder.logits(hidden[index, -1]).float(), cache.repeat_rows(index)
        else:
            hidden, cache = decoder(ids, vision, mask)
            logits = decoder.logits(hidden[:, -1]).float()
        cache.cross_kv = [
            None if kv is None else (kv[0].contiguous(), kv[1].contiguous())
            for kv in cache.cross_kv
        ]
        return logits, cache

    return step, lambda cache, index: cache.select(index)


@torch.no_grad()
def beam_search(
    decoder,
    vision: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    eos: int,
    pad: int,
    cfg: BeamConfig | None = None,
) -> BeamOutput:
    """:func:`generate_beams` on a prismkit ``TextDecoder`` conditioned on ``vision (B, N, D)``."""
    cfg = cfg or BeamConfig()
    step, reorder = decoder_step(decoder, vision, cfg.beams)
    return generate_beams(step, input_ids, attention_mask, cfg, eos, pad, reorder)


@dataclass
class RankOutput:
    """Prismer's closed-set answer ranking, every intermediate kept (B inputs, C candidates)."""

    # (B, C) softmax of the last prompt column's logits at each candidate's first token
    first_token_probs: Tensor
    # (B, k) candidates kept by that first-token filter, best first
    topk_ids: Tensor
    # (B*k, P + A) prompt rows (with their padding) followed by the kept candidates
    input_ids: Tensor
    attention_mask: Tensor
    # (B*k, P + A) targets: candidate tokens, -100 on prompt columns and padding
    labels: Tensor
    # (B*k,) summed label-smoothed cross-entropy of each candidate
    loss_per_sequence: Tensor
    # (B, k) -loss / number of candidate tokens (a label-smoothed mean log-likelihood)
    scores: Tensor
    # (B,) index into the candidate list of the chosen answer
    answer_index: Tensor


@torch.no_grad()
def rank_answers(
    decoder,
    vision: Tensor,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    answer_ids: Tensor,
    answer_mask: Tensor,
    k: int,
    label_smoothing: float = 0.1,
    use_cache: bool = True,
) -> RankOutput:
    """Rank candidate answers as ``PrismerVQA.forward(inference="rank", k_test=k)`` does.

    1. The decoder reads the prompts ``(B, P)`` (right-padded: a shorter prompt's last column is
       a padding position, and its logits are the ones used, as in the reference); softmax over
       the vocabulary at the last column, at each candidate's first token; the ``k`` most likely
       candidates are kept.
    2. Each kept candidate ``(C, A)`` (tokens + EOS, right-padded) is appended to its prompt row
       (padding included) and scored by its label-smoothed summed cross-entropy divided by its
       token count; the best score wins.

    ``use_cache`` (default) scores the candidates on the prompts' cached keys/values: only the
    ``A`` candidate columns run again, ``B k A`` tokens instead of the reference's ``B k (P +
    A)``; the same numbers up to float rounding. False re-reads every prompt, as the reference.
    """
    from prismkit.core.heads import IGNORE, sequence_losses

    b, c = prompt_ids.shape[0], answer_ids.shape[0]
    k = min(k, c)
    pad = decoder.pad_token_id
    hidden, cache = decoder(prompt_ids, vision, prompt_mask)
    logits = decoder.logits(hidden[:, -1]).float()
    probs = logits.softmax(dim=-1).index_select(1, answer_ids[:, 0])
    topk_ids = probs.topk(k, dim=1).indices
    rows = torch.arange(b, device=prompt_ids.device).repeat_interleave(k)
    chosen = topk_ids.reshape(-1)
    input_ids = torch.cat([prompt_ids[rows], answer_ids[chosen]], dim=1)
    mask = torch.cat([prompt_mask[rows], answer_mask[chosen]], dim=1)
    labels = input_ids.masked_fill(input_ids == pad, IGNORE)
    labels[:, : prompt_ids.shape[1]] = IGNORE
    if use_cache:
        # the last prompt column predicts each candidate's first token; the candidate's own
        # columns (run on the cached prompt) predict the rest
        # (each prompt's k rows share its cross-attention keys/values: ``repeat_rows``)
        answers, _ = decoder(answer_ids[chosen], None, mask, cache=cache.repeat_rows(rows))
        hidden = torch.cat([hidden[rows, -1:], answers], dim=1)
        loss = sequence_losses(
            hidden, labels[:, prompt_ids.shape[1] - 1 :], decoder.logits, label_smoothing
        )
    else:
        hidden, _ = decoder(input_ids, vision[rows], mask)
        loss = sequence_losses(hidden, labels, decoder.logits, label_smoothing)
    scores = (-loss / (labels != IGNORE).sum(-1)).view(b, k)
    best = scores.argmax(dim=1)
    return RankOutput(
        probs,
        topk_ids,
        input_ids,
        mask,
        labels,
        loss,
        scores,
        topk_ids.gather(1, best[:, None])[:, 0],
    )
