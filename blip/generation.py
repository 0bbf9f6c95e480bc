"""BLIP's caption generation as transformers 4.15 runs it (BLIP's pinned version): beam search
(``BLIP_Decoder.generate(sample=False)``) and nucleus sampling (``sample=True``, CapFilt's
captioner).

Both drive a decoder through ``step(ids, cache) -> (logits_last (N, V), cache)``: with
``cache=None`` ``ids`` is the whole prompt; afterwards it is the newest token ``(N, 1)`` and the
cache holds the earlier keys/values (``cache.select(rows)`` reorders it), as BLIP's
``prepare_inputs_for_generation`` feeds transformers' ``past``.

Beam search, per step: log_softmax -> repetition penalty on the LOG-PROBS of every id already in
the row, prompt included (``s * p`` if ``s < 0`` else ``s / p``; only when ``p != 1``) -> [SEP]
forbidden while the length (prompt included) is below ``min_length`` -> + running beam score ->
top ``2 * num_beams`` over beams x vocabulary; a [SEP] candidate ranked below ``num_beams``
closes a hypothesis scored ``sum_logprobs / length ** length_penalty`` (length = tokens before
[SEP], prompt included). A row is done once it holds ``num_beams`` hypotheses and the worst of
them beats the best candidate's score divided by ``cur_len`` (the length BEFORE the new token:
transformers 4.15; 4.27 divides by ``cur_len + 1``). At ``max_length`` the open beams become
hypotheses; the best one is returned with [SEP] appended when shorter than ``max_length``, rows
right-padded with ``pad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]


@dataclass
class GenerationConfig:
    # beams kept per row (beam search)
    num_beams: int = 3
    # total length, prompt included (transformers' max_length)
    max_length: int = 20
    # [SEP] is forbidden while the row (prompt included) is shorter than this
    min_length: int = 5
    # >1 discourages ids already in the row (prompt included); 1 = off
    repetition_penalty: float = 1.0
    # hypothesis score = sum log p / length ** length_penalty
    length_penalty: float = 1.0
    # stop a row as soon as it holds num_beams hypotheses
    early_stopping: bool = False
    # the done test divides by cur_len (transformers 4.15, BLIP) or cur_len + 1 (4.27)
    done_len_offset: int = 0
    eos_token_id: int = 102
    pad_token_id: int = 0
    # nucleus sampling: transformers' default top_k 50 applies before top_p
    top_k: int = 50
    top_p: float = 0.9


def repetition_penalty(scores: Tensor, ids: Tensor, penalty: float) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: for every id in each row of ``ids (N, L)``,
    ``s * penalty`` if ``s < 0`` else ``s / penalty``, in place on ``scores (N, V)``."""
    if penalty == 1.0:
        return scores
    s = torch.gather(scores, 1, ids)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter_(1, ids, s)


class _Hypotheses:
    """transformers 4.15 ``BeamHypotheses``: the ``num_beams`` best finished sequences."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool) -> None:
        self.num_beams, self.length_penalty, self.early_stopping = (
            num_beams,
            length_penalty,
            early_stopping,
        )
        self.beams: list[tuple[float, Tensor]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty


@torch.no_grad()
def beam_search(step: Step, input_ids: Tensor, cfg: GenerationConfig) -> tuple[Tensor, Tensor]:
    """``input_ids (B, P)`` prompts (no padding) -> ``(sequences (B, L), scores (B,))``: the best
    hypothesis of each row (prompt, tokens, [SEP] if it fits, then pads) and its score. The
    decoder's inputs other than the ids (image tokens) must already be repeated per beam
    (``repeat_interleave(num_beams)``), as BLIP does."""
    b, k = input_ids.shape[0], cfg.num_beams
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    ids = input_ids.repeat_interleave(k, dim=0)
    beam_scores = torch.zeros(b, k, device=ids.device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(k, cfg.length_penalty, cfg.early_stopping) for _ in range(b)]
    done = [False] * b
    cache = None
    cur_len = ids.shape[1]
    while True:
        logits, cache = step(ids if cache is None else ids[:, -1:], cache)
        scores = F.log_softmax(logits.float(), dim=-1)
        scores = repetition_penalty(scores, ids, cfg.repetition_penalty)
        if cur_len < cfg.min_length:
            scores[:, eos] = -float("inf")
        scores = scores + beam_scores[:, None]
        v = scores.shape[-1]
        top, tok = torch.topk(scores.view(b, k * v), 2 * k, dim=1, largest=True, sorted=True)
        origin, tok = tok // v, tok % v
        next_scores = torch.zeros(b, k, device=ids.device)
        next_tokens = torch.zeros(b, k, dtype=torch.long, device=ids.device)
        next_rows = torch.zeros(b, k, dtype=torch.long, device=ids.device)
        for r in range(b):
            if done[r]:  # finished rows carry on with padding (from row 0, as transformers)
                next_tokens[r] = pad
                continue
            j = 0
            for rank in range(2 * k):
                t, s, row = int(tok[r, rank]), top[r, rank], r * k + int(origin[r, rank])
                if t == eos:
                    if rank >= k:
                        continue
                    hyps[r].add(ids[row].clone(), s.item())
                else:
                    next_scores[r, j], next_tokens[r, j], next_rows[r, j] = s, t, row
                    j += 1
                if j == k:
                    break
            done[r] = done[r] or hyps[r].is_done(top[r].max().item(), cur_len + cfg.done_len_offset)
        beam_scores = next_scores.view(-1)
        rows = next_rows.view(-1)
        ids = torch.cat([ids[rows], next_tokens.view(-1, 1)], dim=1)
        cache = cache.select(rows)
        cur_len += 1
        if all(done) or cur_len >= cfg.max_length:
            break
    for r in range(b):  # open beams become hypotheses
        if not done[r]:
            for j in range(k):
                hyps[r].add(ids[r * k + j], beam_scores[r * k + j].item())
    best, best_scores = [], torch.zeros(b)
    for r in range(b):
        score, hyp = sorted(hyps[r].beams, key=lambda x: x[0])[-1]
        best.append(hyp)
        best_scores[r] = score
    lengths = [len(h) for h in best]
    width = min(max(lengths) + 1, cfg.max_length)
    out = torch.full((b, width), pad, dtype=torch.long)
    for r, hyp in enumerate(best):
        out[r, : lengths[r]] = hyp.cpu()
        if lengths[r] < cfg.max_length:
            out[r, lengths[r]] = eos
    return out, best_scores


def top_k_top_p(logits: Tensor, top_k: int, top_p: float, keep: int = 1) -> Tensor:
    """transformers 4.15's TopKLogitsWarper then TopPLogitsWarper: -inf outside the ``top_k``
    largest, then outside the nucleus (a token goes when the probability of the tokens ranked
    above it already exceeds ``top_p``; the top token always stays)."""
    if top_k:
        k = min(max(top_k, keep), logits.shape[-1])
        logits = logits.masked_fill(logits < torch.topk(logits, k)[0][..., -1, None], -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        if keep > 1:
            remove[..., : keep - 1] = False
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


@torch.no_grad()
def sample(
    step: Step,
    input_ids: Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """transformers 4.15 ``sample``: per step the repetition penalty on the LOGITS, the
    min-length rule, top-k then top-p, one multinomial draw; finished rows append ``pad``.
    Stops at ``max_length`` (prompt included) or when every row has emitted [SEP]. Returns
    ``(B, L)`` ids, prompt included."""
    ids = input_ids
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    cache = None
    while True:
        logits, cache = step(ids if cache is None else ids[:, -1:], cache)
        scores = repetition_penalty(logits.float().clone(), ids, cfg.repetition_penalty)
        if ids.shape[1] < cfg.min_length:
            scores[:, cfg.eos_token_id] = -float("inf")
        scores = top_k_top_p(scores, cfg.top_k, cfg.top_p)
        probs = F.softmax(scores, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        tokens = tokens * unfinished + cfg.pad_token_id * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        unfinished = unfinished * (tokens != cfg.eos_token_id).long()
        if int(unfinished.max()) == 0 or ids.shape[1] >= cfg.max_length:
            return ids
