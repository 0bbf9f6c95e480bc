"""Beam search (transformers' semantics) with and without the cache, and answer ranking, against
direct computation. Exact agreement with the reference is tested in test_prismer_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_for
from torch import nn

from prismkit.core.generation import BeamConfig, beam_search, generate_beams, rank_answers
from prismkit.core.model import create_model

EOS, PAD = 3, 0


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
    cfg = BeamConfig(beams=3, max_length=12, min_length=6)
    a = beam_search(model.language, vision, ids, mask, EOS, PAD, cfg)
    b = beam_search(
        model.language, vision, ids, mask, EOS, PAD, BeamConfig(**{**vars(cfg), "use_cache": False})
    )
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.sequences[:, :4], ids)  # the prompt comes back first
    assert 6 <= a.sequences.shape[1] <= 12  # lengths count the prompt, as in transformers


def test_beam_one_is_greedy(trained_ish):
    model, vision, ids, mask = trained_ish
    out = beam_search(
        model.language,
        vision,
        ids,
        mask,
        EOS,
        PAD,
        BeamConfig(beams=1, max_length=9, min_length=0, length_penalty=0),
    )
    seq, m = ids.clone(), mask.clone()
    for _ in range(5):
        h, _ = model.language(seq, vision, m)
        nxt = model.language.logits(h[:, -1]).argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
    for row, greedy in zip(out.new_tokens(EOS, PAD), seq[:, 4:].tolist(), strict=True):
        assert row == (greedy[: greedy.index(EOS)] if EOS in greedy else greedy)


def test_min_length_blocks_eos_and_counts_the_prompt(trained_ish):
    model, vision, ids, mask = trained_ish
    with torch.no_grad():
        model.language.head.bias[EOS] = 50.0  # EOS is overwhelmingly likely
    out = beam_search(
        model.language,
        vision,
        ids,
        mask,
        EOS,
        PAD,
        BeamConfig(beams=2, max_length=12, min_length=9),
    )
    # EOS first allowed when the sequence (4 prompt tokens) is 9 long: 5 new tokens, then EOS
    assert out.sequences.shape == (2, 10)
    assert (out.sequences[:, 9] == EOS).all() and (out.sequences[:, 4:9] != EOS).all()


def _toy_step(table: torch.Tensor):
    """A 'model' whose next-token logits depend on the last token only: ``table[last]``."""

    def step(ids, mask, cache):
        return table[ids[:, -1]], None

    return step


def test_beam_search_semantics_on_a_toy_model():
    """Hand-checkable: log-softmax, then min length, then beams; EOS closes a hypothesis scored
    sum_logprobs / len (prompt included)."""
    v = 5
    logits = torch.full((v, v), -5.0)
    logits[0, 1] = 2.0  # after the prompt token 0: 1 is best, EOS (4) second
    logits[0, 4] = 1.0
    logits[1, 4] = 3.0  # after 1: EOS
    logits[2, 4] = 3.0
    logits[3, 4] = 3.0
    logp = F.log_softmax(logits, -1)
    step = _toy_step(logits)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    cfg = BeamConfig(beams=2, max_length=5, min_length=0, use_cache=False)
    out = generate_beams(step, prompt, torch.ones_like(prompt), cfg, eos=4, pad=0)
    # hypotheses: [0] + EOS (score logp[0,4] / 1) and [0, 1] + EOS ((logp[0,1] + logp[1,4]) / 2)
    best = max(logp[0, 4] / 1, (logp[0, 1] + logp[1, 4]) / 2)
    torch.testing.assert_close(out.scores[0], best)
    # min_length forbids the early EOS: the longer hypothesis wins
    cfg_min = BeamConfig(beams=2, max_length=5, min_length=2, use_cache=False)
    out = generate_beams(step, prompt, torch.ones_like(prompt), cfg_min, eos=4, pad=0)
    assert out.sequences[0].tolist()[:3] == [0, 1, 4]


def test_repetition_penalty_applies_to_log_probs_including_the_prompt():
    v = 4
    logits = torch.zeros(v, v)
    logits[:, 2] = 1.0  # token 2 is always best
    step = _toy_step(logits)
    prompt = torch.tensor([[2]])
    plain = generate_beams(
        step,
        prompt,
        torch.ones_like(prompt),
        BeamConfig(beams=1, max_length=2, min_length=0, use_cache=False),
        eos=3,
        pad=0,
    )
    assert plain.sequences[0, 1] == 2
    penalised = generate_beams(
        step,
        prompt,
        torch.ones_like(prompt),
        BeamConfig(beams=1, max_length=2, min_length=0, repetition_penalty=5.0, use_cache=False),
        eos=3,
        pad=0,
    )
    assert penalised.sequences[0, 1] != 2  # the prompt's 2 was penalised (log p * 5)


def test_rank_answers_matches_direct_likelihood(trained_ish):
    model, vision, _, _ = trained_ish
    q = torch.tensor([[2, 20, 21, 22], [2, 23, 0, 0]])  # right-padded questions
    qm = (q != 0).long()
    a = torch.tensor([[30, 3, 0, 0], [31, 32, 3, 0], [33, 34, 35, 3]])
    am = (a != 0).long()
    r = rank_answers(model.language, vision, q, qm, a, am, k=3, label_smoothing=0.0)
    for b in range(2):
        for j, c in enumerate(r.topk_ids[b].tolist()):
            n = int(am[c].sum())
            seq = torch.cat([q[b], a[c, :n]])[None]
            m = torch.cat([qm[b], am[c, :n]])[None]
            h, _ = model.language(seq, vision[b : b + 1], m)
            logp = model.language.logits(h[0, q.shape[1] - 1 : -1]).log_softmax(-1)
            direct = logp.gather(-1, a[c, :n, None]).mean()
            torch.testing.assert_close(r.scores[b, j], direct, atol=1e-4, rtol=1e-4)
    assert r.answer_index.tolist() == [int(r.topk_ids[b, r.scores[b].argmax()]) for b in range(2)]
    top2 = rank_answers(model.language, vision, q, qm, a, am, k=2, label_smoothing=0.0)
    assert top2.scores.shape == (2, 2) and torch.equal(top2.topk_ids, r.topk_ids[:, :2])


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


def test_decoder_step_keeps_cross_attention_keys_heads_major(trained_ish):
    from prismkit.core.generation import decoder_step

    model, vision, ids, mask = trained_ish
    step, _ = decoder_step(model.language, vision, 3)
    with torch.no_grad():
        _, cache = step(ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), None)
    kvs = [kv for kv in cache.cross_kv if kv is not None]
    assert kvs and all(k.is_contiguous() and v.is_contiguous() for k, v in kvs)
    assert kvs[0][0].shape[0] == ids.shape[0]  # one image's keys serve its beams


def test_decoding_under_autocast_casts_each_weight_once(trained_ish, monkeypatch):
    """The step function casts the decoder's weights once per generation: the same captions and
    scores as autocast casting them at every step."""
    import contextlib

    from prismkit.core import generation, layers

    model, vision, ids, mask = trained_ish
    cfg = BeamConfig(beams=3, max_length=12, min_length=6)
    casts: list[int] = []  # the weights actually cast (cache misses)
    real = layers._cast_once

    def counted(t, dtype, store):
        before = store.get(id(t))
        out = real(t, dtype, store)
        if before is None or before[2] is not out:
            casts.append(id(t))
        return out

    monkeypatch.setattr(layers, "_cast_once", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once = beam_search(model.language, vision, ids, mask, EOS, PAD, cfg)
        monkeypatch.setattr(generation, "cast_weights_once", lambda store: contextlib.nullcontext())
        every_step = beam_search(model.language, vision, ids, mask, EOS, PAD, cfg)
    assert torch.equal(once.sequences, every_step.sequences)
    torch.testing.assert_close(once.scores, every_step.scores, rtol=0, atol=0)
    weights = [p for m in model.language.modules() if isinstance(m, nn.Linear) for p in [m.weight]]
    cast = [c for c in casts if c in {id(w) for w in weights}]
    assert len(cast) == len(set(cast)) == len(weights)  # every linear weight, each once
