"""BLIP head (ITC + ITM + LM), retrieval, nucleus sampling and CapFilt on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TestPlugin, batch_for, tiny_config

from prismkit.blip import capfilt
from prismkit.blip.capfilt import nucleus_sample, top_p_filter
from prismkit.blip.objective import (
    BLIPObjective,
    caption_tokens,
    sample_hard_negatives,
    soft_itc_loss,
)
from prismkit.blip.retrieval import recall_at_k, rerank, retrieval_eval
from prismkit.core.checkpoint import save_checkpoint
from prismkit.core.cli import build_parser
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import create_model
from prismkit.core.processor import Processor


@pytest.fixture(scope="module")
def blip_host():
    return get_plugin_manager(extra_plugins=[TestPlugin()])  # blip comes from its entry point


def _blip_model(tiny_dir, blip_host, name: str = "tiny_z"):
    torch.manual_seed(0)
    return create_model(tiny_config(tiny_dir, name, head="blip"), blip_host)


def _small_queue(model, size: int = 8) -> None:
    obj = model.objective
    e = obj.image_queue.shape[1]
    obj.image_queue = torch.zeros(size, e)
    obj.text_queue = torch.zeros(size, e)
    obj.hash_queue = torch.zeros(size, dtype=torch.long)


def test_caption_tokens_keep_bos_and_target():
    ids = torch.tensor([[2, 7, 8, 9, 10, 3, 0], [2, 7, 11, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor(
        [[-100, -100, -100, 9, 10, 3, -100], [-100, -100, 11, 3, -100, -100, -100]]
    )
    out, m = caption_tokens(ids, mask, labels)
    assert out.tolist() == [[2, 9, 10, 3], [2, 11, 3, 0]]
    assert m.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_loss_parts_and_gradients(tiny_dir, blip_host):
    model = _blip_model(tiny_dir, blip_host, "tiny")
    _small_queue(model)
    model.train()
    out = model(**batch_for(model, b=3))
    assert torch.isfinite(out.loss)
    assert set(out.parts) == {"itc", "itm", "lm"}
    assert all(torch.isfinite(v) for v in out.parts.values())
    out.loss.backward()
    obj = model.objective
    for part in (obj.vision_proj, obj.text_proj, obj.itm_head, model.resampler, model.expert_stems):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert obj.temp.grad is not None and obj.temp.grad != 0
    layer = model.language.layers[0]  # language trainable parts (zero-init out_proj: its grad)
    for p in (layer.cross_attn.out_proj.weight, model.language.word_embeddings.weight):
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.adaptor.parameters())
    assert obj.queue_ptr.item() == 3 and obj.queue_filled.item() == 3
    # the momentum copies are buffers: never trained, never in the optimizer
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("_m_" in n or "queue" in n for n in names)
    assert "objective.vision_proj.weight" in names and "objective.temp" in names


def test_momentum_update_is_an_ema():
    obj = BLIPObjective(width=8, embed_dim=4, queue_size=5, momentum=0.9)
    with torch.no_grad():
        obj.vision_proj_m_weight.fill_(7.0)  # stale, e.g. after loading a checkpoint
    obj.momentum_update()  # first call: the copies start from the online weights
    torch.testing.assert_close(obj.vision_proj_m_weight, obj.vision_proj.weight.detach())
    before = obj.text_proj_m_weight.clone()
    with torch.no_grad():
        obj.text_proj.weight.add_(1.0)
    obj.momentum_update()
    torch.testing.assert_close(
        obj.text_proj_m_weight, 0.9 * before + 0.1 * obj.text_proj.weight.detach()
    )


def test_queue_pointer_wraps():
    obj = BLIPObjective(width=8, embed_dim=2, queue_size=5)
    a = torch.arange(6.0).view(3, 2)
    obj.enqueue(a, -a)
    assert obj.queue_ptr.item() == 3 and obj.queue_filled.item() == 3
    b = torch.arange(6.0, 12.0).view(3, 2)
    obj.enqueue(b, -b)
    assert obj.queue_ptr.item() == 1 and obj.queue_filled.item() == 5
    torch.testing.assert_close(obj.image_queue, torch.cat([b[2:], a[1:], b[:2]]))
    torch.testing.assert_close(obj.text_queue, -obj.image_queue)
    obj.enqueue(torch.ones(7, 2), torch.ones(7, 2))  # more than the queue: the last 5 kept
    assert obj.queue_ptr.item() == 1 and bool((obj.image_queue == 1).all())


def test_hard_negatives_never_pick_the_positive():
    sim = torch.full((4, 6), -50.0)
    positive = torch.tensor([0, 3, 5, 2])
    sim[torch.arange(4), positive] = 50.0  # almost all the mass on the positive
    g = torch.Generator().manual_seed(0)
    picks = sample_hard_negatives(sim.repeat(500, 1), positive.repeat(500), g)
    assert not bool((picks == positive.repeat(500)).any())
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))


def test_itc_without_distillation_is_cross_entropy():
    sim, sim_m = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(
        soft_itc_loss(sim, sim_m, 0.0), F.cross_entropy(sim, torch.arange(3))
    )


def test_constructor_needs_width_and_shared_weights():
    with pytest.raises(ValueError, match="width"):
        BLIPObjective(label_smoothing=0.1)
    with pytest.raises(ValueError, match="share_weights"):
        BLIPObjective(width=8, share_weights=False)


def test_gathering_under_torch_distributed(tiny_dir, blip_host, tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = _blip_model(tiny_dir, blip_host)
        _small_queue(model)
        model.train()
        out = model(**batch_for(model, b=2))
        out.loss.backward()
        assert torch.isfinite(out.loss) and model.objective.itm_head.weight.grad is not None
    finally:
        dist.destroy_process_group()


# -- retrieval ---------------------------------------------------------------------------------
def test_rerank_and_recall_on_a_forced_case():
    # 3 images, 6 texts (2 per image); ITC ranks a wrong text first, ITM knows the truth
    text_image = [0, 0, 1, 1, 2, 2]
    truth = torch.tensor([[float(j == i) for j in text_image] for i in range(3)])
    sim = truth * 0.5 + torch.roll(truth, 2, dims=1) * 0.6  # wrong texts beat the right ones
    itm = lambda q, c: truth[q, c] * 10  # noqa: E731
    i2t = rerank(sim, 3, itm)
    t2i = rerank(sim.t(), 3, lambda t, i: truth[i, t] * 10)
    assert [text_image[j] for j in i2t.argmax(1).tolist()] == [0, 1, 2]
    r = recall_at_k(i2t, t2i, text_image)
    assert r["txt_r1"] == r["img_r1"] == 100.0 and r["r_mean"] == 100.0
    no_itm = recall_at_k(sim, sim.t(), text_image)  # ITC alone gets R@1 wrong
    assert no_itm["txt_r1"] == no_itm["img_r1"] == 0.0
    worst = recall_at_k(-truth, -truth.t(), text_image)
    assert worst["txt_r1"] == worst["img_r1"] == 0.0 and worst["txt_r5"] == 100.0


def test_retrieval_eval_on_a_tiny_model(tiny_dir, blip_host):
    model = _blip_model(tiny_dir, blip_host)
    proc = Processor.from_config(model.config)
    images = torch.rand(3, 3, 32, 32)
    texts = ["a red circle", "a blue square", "a green triangle", "a red shape"]
    r = retrieval_eval(model, proc, images, texts, k_test=2, text_image=[0, 1, 2, 0])
    assert set(r) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert all(0 <= v <= 100 for v in r.values()) and r["txt_r5"] == r["img_r5"] == 100.0


# -- nucleus sampling --------------------------------------------------------------------------
def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 1.0).isfinite().all()


def test_nucleus_sampling_respects_top_p_and_lengths(tiny_dir, blip_host):
    model = _blip_model(tiny_dir, blip_host)
    lang, eos, top = model.language, 3, 40
    vision = torch.randn(4, 5, 32)
    ids, mask = torch.tensor([[2, 30]] * 4), torch.ones(4, 2, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lang.head.bias.zero_()
        lang.head.bias[top] = 4.0  # p(top) ~ 0.3: top_p = 1 samples other tokens too
    free = nucleus_sample(
        lang, vision, ids, mask, eos, top_p=1.0, max_length=9, min_length=0, generator=g
    )
    assert any(t != top for row in free for t in row)
    with torch.no_grad():
        lang.head.bias[top] = 12.0  # peaked: the nucleus at 0.9 is the top token alone
    out = nucleus_sample(
        lang, vision, ids, mask, eos, top_p=0.9, max_length=7, min_length=2, generator=g
    )
    assert out == [[top] * 6] * 4  # max_length counts the (forced) EOS
    with torch.no_grad():
        lang.head.bias[eos] = 30.0  # EOS is the top token, blocked until min_length
    out = nucleus_sample(
        lang, vision, ids, mask, eos, top_p=0.9, max_length=7, min_length=3, generator=g
    )
    assert [len(r) for r in out] == [3] * 4 and all(t == top for r in out for t in r)
    with pytest.raises(ValueError, match="min_length"):
        nucleus_sample(lang, vision, ids, mask, eos, max_length=3, min_length=3)


# -- CapFilt and training ----------------------------------------------------------------------
def _web_data(tmp_path, n: int = 6):
    import easy_vqa

    paths = list(easy_vqa.get_train_image_paths().values())[:n]
    words = [
        "a red circle",
        "a blue triangle",
        "a green rectangle",
        "the shape",
        "a picture",
        "yes",
    ]
    web = tmp_path / "web.jsonl"
    web.write_text(
        "".join(
            json.dumps({"image": p, "caption": c}) + "\n" for p, c in zip(paths, words, strict=True)
        )
    )
    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"image": paths[0], "caption": "a gray circle"}) + "\n")
    return web, human


def test_capfilt_end_to_end(tiny_dir, blip_host, tmp_path, monkeypatch):
    web, human = _web_data(tmp_path)
    cap_ckpt, filt_ckpt = tmp_path / "cap.safetensors", tmp_path / "filt.safetensors"
    torch.manual_seed(0)
    save_checkpoint(create_model(tiny_config(tiny_dir, "tiny_z"), blip_host), cap_ckpt, blip_host)
    save_checkpoint(_blip_model(tiny_dir, blip_host), filt_ckpt, blip_host)
    out = tmp_path / "out" / "new.jsonl"
    history = capfilt.capfilt(
        web,
        cap_ckpt,
        filt_ckpt,
        out,
        blip_host,
        human=human,
        threshold=0.0,
        max_length=6,
        min_length=2,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows].count("web") == 6 and rows[-1]["source"] == "human"
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert history[0]["synthetic", "kept"] == len(synthetic) >= 1
    assert all(0 <= r["itm_score"] <= 1 for r in rows[:-1]) and rows[-1]["itm_score"] is None
    assert all(set(r) == {"image", "caption", "source", "itm_score"} for r in rows)

    # the command: an impossible threshold drops every web and synthetic pair, human pairs stay
    parser = build_parser(blip_host)
    args = parser.parse_args(
        [
            "capfilt", str(web), "--captioner", str(cap_ckpt), "--filter", str(filt_ckpt),
            "--out", str(out), "--human", str(human), "--threshold", "1.01", "--rounds", "2",
            "--max-length", "6", "--min-length", "2",
        ]
    )  # fmt: skip
    args.host = blip_host
    assert args.func(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["human"]
    with pytest.raises(ValueError, match="blip"):
        capfilt.capfilt(web, filt_ckpt, cap_ckpt, tmp_path / "x.jsonl", blip_host)


def test_train_two_steps_with_blip(tiny_dir, blip_host, tmp_path):
    from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train

    cfg = tiny_config(tiny_dir, "tiny_z", head="blip")
    run = RunConfig(
        data=DataConfig(dataset="easyvqa_captions", fraction=0.05),
        train=TrainConfig(
            steps=2, batch_size=4, warmup=1, eval_questions=0, log_every=1, out_dir=str(tmp_path)
        ),
    )
    result = train(cfg, run, blip_host)
    assert torch.isfinite(torch.tensor(result["final_loss"]))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    assert {"objective.itm_head.weight", "objective.vision_proj.weight", "objective.temp"} <= set(
        state
    )


def test_identical_captions_are_positives_not_negatives() -> None:
    from prismkit.blip.objective import sample_hard_negatives, soft_itc_loss, text_hash

    ids = torch.tensor([[2, 7, 9, 3, 0], [2, 7, 9, 3, 0], [2, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    h = text_hash(ids, mask)
    assert h[0] == h[1] != h[2]
    wide = torch.nn.functional.pad(ids, (0, 3))
    assert torch.equal(text_hash(wide, (wide != 0).long()), h)  # padding width does not matter
    same = h[:, None] == h[None, :]
    sim = torch.zeros(3, 3)
    sim[0, 1] = 50.0  # the duplicate caption is by far the most similar
    g = torch.Generator().manual_seed(0)
    picks = [int(sample_hard_negatives(sim, torch.arange(3), g, same=same)[0]) for _ in range(200)]
    assert set(picks) == {2}
    loss_dup = soft_itc_loss(sim, sim, 0.0, same)
    hard = same.float() / same.float().sum(1, keepdim=True)
    assert torch.allclose(loss_dup, -(sim.log_softmax(1) * hard).sum(1).mean())
