"""Beam search with a key/value cache, and log-likelihood ranking of candidate answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prismkit.core.language.decoder import TextDecoder


@dataclass
class BeamConfig:
    # beams kept per image
    beams: int = 3
    # new tokens at most (EOS included)
    max_length: int = 20
    # new tokens before EOS may be chosen
    min_length: int = 8
    # final score = sum log p / length ** length_penalty
    length_penalty: float = 1.0
    # reuse keys/values of earlier positions (False recomputes the whole prefix every step)
    use_cache: bool = True


@torch.no_grad()
def beam_search(
    decoder: TextDecoder,
    vision: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    eos: int,
    pad: int,
    cfg: BeamConfig | None = None,
) -> list[list[int]]:
    """Generate after left-padded prompts ``input_ids (B, P)`` attending to ``vision (B, Nv, D)``.

    Returns the best continuation of each prompt (token ids, without EOS).
    """
    cfg = cfg or BeamConfig()
    if not 0 <= cfg.min_length < cfg.max_length:
        raise ValueError(
            f"need 0 <= min_length < max_length (max counts the EOS); got {cfg.min_length}, {cfg.max_length}"
        )
    b, k = input_ids.shape[0], cfg.beams
    flat = torch.arange(b, device=vision.device).repeat_interleave(k)
    vision, ids, mask = vision[flat], input_ids[flat], attention_mask[flat]
    scores = torch.zeros(b, k, device=vision.device)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one until they diverge
    scores = scores.view(-1)
    done = torch.zeros(b * k, dtype=torch.bool, device=vision.device)
    lengths = torch.zeros(b * k, device=vision.device)
    generated = ids.new_zeros(b * k, 0)
    hidden, cache = decoder(ids, vision, mask)
    for step in range(cfg.max_length):
        logp = decoder.logits(hidden[:, -1]).float().log_softmax(-1)
        if step < cfg.min_length:
            logp[:, eos] = float("-inf")
        if step == cfg.max_length - 1:  # last step: only EOS
            keep = logp[:, eos].clone()
            logp.fill_(float("-inf"))
            logp[:, eos] = keep
        logp[done] = float("-inf")
        logp[done, pad] = 0.0  # finished beams carry on with padding at no cost
        v = logp.shape[-1]
        cand = (scores[:, None] + logp).view(b, k * v)
        top, idx = cand.topk(k, dim=-1)
        origin = (idx // v + torch.arange(b, device=idx.device)[:, None] * k).view(-1)
        token = (idx % v).view(-1)
        scores = top.view(-1)
        done, lengths = done[origin], lengths[origin]
        lengths = lengths + (~done).float()
        generated = torch.cat([generated[origin], token[:, None]], dim=1)
        done = done | (token == eos)
        if bool(done.all()):
            break
        step_mask = (~done | (token == eos)).long()[:, None]
        if cfg.use_cache:
            cache = cache.select(origin)
            hidden, cache = decoder(token[:, None], None, step_mask, cache=cache)
        else:
            ids = torch.cat([ids[origin], token[:, None]], dim=1)
            mask = torch.cat([mask[origin], step_mask], dim=1)
            hidden, _ = decoder(ids, vision, mask)
    final = (scores / lengths.clamp_min(1) ** cfg.length_penalty).view(b, k)
    best = final.argmax(-1) + torch.arange(b, device=final.device) * k
    out = []
    for row in generated[best].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def score_candidates(
    decoder: TextDecoder,
    vision: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    candidates: list[list[int]],
    pad: int,
    top_k: int | None = None,
) -> Tensor:
    """Mean log-likelihood ``(B, C)`` of each candidate (ids ending in EOS) after each prompt.

    With ``top_k``, only the ``top_k`` candidates whose first token is likeliest are scored in
    full (Prismer's closed-ended VQA); the others get -inf.
    """
    b, c = input_ids.shape[0], len(candidates)
    hidden, cache = decoder(input_ids, vision, attention_mask)
    first = decoder.logits(hidden[:, -1]).float().log_softmax(-1)  # (B, V)
    first_tok = torch.tensor([cand[0] for cand in candidates], device=vision.device)
    scores = torch.full((b, c), float("-inf"), device=vision.device)
    if top_k is None or top_k >= c:
        chosen = torch.arange(c, device=vision.device).expand(b, c)
    else:
        chosen = first[:, first_tok].topk(top_k, dim=-1).indices
    n = chosen.shape[1]
    width = max(len(cand) for cand in candidates)
    cand_ids = torch.full((c, width), pad, dtype=torch.long, device=vision.device)
    cand_mask = torch.zeros((c, width), dtype=torch.long, device=vision.device)
    for i, cand in enumerate(candidates):
        cand_ids[i, : len(cand)] = torch.tensor(cand)
        cand_mask[i, : len(cand)] = 1
    ids, m = cand_ids[chosen.reshape(-1)], cand_mask[chosen.reshape(-1)]
    rows = torch.arange(b, device=vision.device).repeat_interleave(n)
    hidden, _ = decoder(ids, None, m, cache=cache.select(rows))
    logp = decoder.logits(hidden[:, :-1]).float().log_softmax(-1)
    tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    total = first[rows, ids[:, 0]] + (tok_logp * m[:, 1:]).sum(-1)
    mean = total / m.sum(-1)
    scores.scatter_(1, chosen, mean.view(b, n))
    return scores
