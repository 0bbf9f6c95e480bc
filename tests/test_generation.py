"""Beam search with and without the cache, and candidate ranking, against direct computation."""

from __future__ import annotations

import pytest
import torch
from helpers import batch_for

from prismkit.core.generation import BeamConfig, beam_search, score_candidates
from prismkit.core.model import create_model


@pytest.fixture
def trained_ish(host, tiny_cfg):
    """A tiny model whose trainable weights are randomised so generation is not degenerate."""
    torch.manual_seed(1)
    model = create_model(tiny_cfg, host).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    batch = batch_for(model)
    vision = model.encode_image(batch["images"], batch["experts"])
    ids = torch.tensor([[0, 2, 20, 21], [2, 22, 23, 24]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left-padded prompts
    return model, vision, ids, mask


def test_cached_equals_uncached(trained_ish):
    model, vision, ids, mask = trained_ish
    a = beam_search(
        model.language,
        vision,
        ids,
        mask,
        eos=3,
        pad=0,
        cfg=BeamConfig(beams=3, max_length=10, min_length=2),
    )
    b = beam_search(
        model.language,
        vision,
        ids,
        mask,
        eos=3,
        pad=0,
        cfg=BeamConfig(beams=3, max_length=10, min_length=2, use_cache=False),
    )
    assert a == b
    assert all(2 <= len(x) <= 10 for x in a)


def test_beam_one_is_greedy(trained_ish):
    model, vision, ids, mask = trained_ish
    out = beam_search(
        model.language,
        vision,
        ids,
        mask,
        eos=3,
        pad=0,
        cfg=BeamConfig(beams=1, max_length=6, min_length=0, length_penalty=0),
    )
    seq, m = ids.clone(), mask.clone()
    greedy = [[], []]
    for _ in range(5):  # max_length counts the EOS forced at the last step
        h, _ = model.language(seq, vision, m)
        nxt = model.language.logits(h[:, -1]).argmax(-1)
        for i in range(2):
            greedy[i].append(nxt[i].item())
        seq, m = (
            torch.cat([seq, nxt[:, None]], 1),
            torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1),
        )
    for o, g in zip(out, greedy, strict=True):
        assert o == (g[: g.index(3)] if 3 in g else g)


def test_min_length_blocks_eos(trained_ish):
    model, vision, ids, mask = trained_ish
    with torch.no_grad():
        model.language.head.bias[3] = 50.0  # EOS is overwhelmingly likely
    out = beam_search(
        model.language,
        vision,
        ids,
        mask,
        eos=3,
        pad=0,
        cfg=BeamConfig(beams=2, max_length=8, min_length=5),
    )
    assert all(len(x) == 5 for x in out)


def test_candidate_scores_match_direct_likelihood(trained_ish):
    model, vision, ids, mask = trained_ish
    cands = [[30, 3], [31, 32, 3], [33, 34, 35, 3]]
    scores = score_candidates(model.language, vision, ids, mask, cands, pad=0)
    for b in range(2):
        for c, cand in enumerate(cands):
            seq = torch.cat([ids[b : b + 1], torch.tensor([cand])], 1)
            m = torch.cat([mask[b : b + 1], torch.ones(1, len(cand), dtype=torch.long)], 1)
            h, _ = model.language(seq, vision[b : b + 1], m)
            logp = model.language.logits(h[0, ids.shape[1] - 1 : -1]).log_softmax(-1)
            direct = logp.gather(-1, torch.tensor(cand)[:, None]).mean()
            torch.testing.assert_close(scores[b, c], direct, atol=1e-4, rtol=1e-4)
    top = score_candidates(model.language, vision, ids, mask, cands, pad=0, top_k=2)
    assert (torch.isfinite(top).sum(-1) == 2).all()
    finite = torch.isfinite(top)
    torch.testing.assert_close(top[finite], scores[finite])


def test_text_only_decoding_skips_cross_attention(trained_ish):
    """No vision tokens: the language model alone (BLIP's text encoder, SimVLM's text batches)."""
    model, vision, ids, mask = trained_ish
    h, cache = model.language(ids, None, mask)
    assert all(kv is None for kv in cache.cross_kv)
    step, _ = model.language(
        ids[:, -1:],
        None,
        torch.ones(2, 1, dtype=torch.long),
        cache=cache.select(torch.tensor([1, 0])),
    )
    assert step.shape == (2, 1, 32) and torch.isfinite(step).all()
    with_vision, _ = model.language(ids, vision, mask)
    assert not torch.allclose(h, with_vision)
