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

from prismkit.core.generation import BeamConfig, generate_beams

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


@torch.no_grad()
def beam_search(step: Step, input_ids: Tensor, cfg: GenerationConfig) -> tuple[Tensor, Tensor]:
    """``input_ids (B, P)`` prompts (no padding) -> ``(sequences (B, L), scores (B,))``: the best
    hypothesis of each row (prompt, tokens, [SEP] if it fits, then pads) and its score. The
    decoder's inputs other than the ids (image tokens) must already be repeated per beam
    (``repeat_interleave(num_beams)``), as BLIP does. The search is the core's
    :func:`~prismkit.core.generation.generate_beams` with transformers 4.15's stopping test."""
    beams = BeamConfig(
        beams=cfg.num_beams,
        max_length=cfg.max_length,
        min_length=cfg.min_length,
        length_penalty=cfg.length_penalty,
        repetition_penalty=cfg.repetition_penalty,
        stop_offset=cfg.done_len_offset,
        early_stopping=cfg.early_stopping,
    )
    out = generate_beams(
        lambda ids, _mask, cache: step(ids, cache),
        input_ids,
        torch.ones_like(input_ids),
        beams,
        cfg.eos_token_id,
        cfg.pad_token_id,
        lambda cache, rows: cache.select(rows),
    )
    return out.sequences, out.scores


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
