"""The ``blip_frozen`` head: BLIP's objectives (ITC + ITM + LM) on Prismer's frozen backbones,
its state in checkpoints, optimizer-step schedules, retrieval through its scorer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TestPlugin, batch_for, tiny_config

from prismkit.blip.frozen import (
    FrozenBLIPObjective,
    FrozenScorer,
    caption_tokens,
    sample_hard_negatives,
    soft_itc_loss,
)
from prismkit.blip.retrieval import evaluate
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import create_model
from prismkit.core.processor import Processor


@pytest.fixture(scope="module")
def blip_host():
    return get_plugin_manager(extra_plugins=[TestPlugin()])  # blip comes from its entry point


def _blip_model(tiny_dir, blip_host, name: str = "tiny_z"):
    torch.manual_seed(0)
    return create_model(tiny_config(tiny_dir, name, head="blip_frozen"), blip_host)


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
    obj = FrozenBLIPObjective(width=8, embed_dim=4, queue_size=5, momentum=0.9)
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
    obj = FrozenBLIPObjective(width=8, embed_dim=2, queue_size=5)
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
        FrozenBLIPObjective(label_smoothing=0.1)
    with pytest.raises(ValueError, match="share_weights"):
        FrozenBLIPObjective(width=8, share_weights=False)


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
def test_retrieval_through_the_frozen_scorer(tiny_dir, blip_host):
    model = _blip_model(tiny_dir, blip_host).eval()
    proc = Processor.from_config(model.config)
    images = torch.rand(3, 3, 32, 32)
    texts = ["a red circle", "a blue square", "a green triangle", "a red shape"]
    enc = proc.encode([""] * len(texts), texts)
    r = evaluate(
        FrozenScorer(model, blip_host),
        images,
        enc["input_ids"],
        enc["attention_mask"],
        [0, 1, 2, 0],
        k_test=2,
    )
    assert set(r.metrics) >= {"txt_r1", "txt_r5", "img_r1", "r_mean"}
    assert r.metrics["txt_r5"] == r.metrics["img_r5"] == 100.0
    assert r.score_i2t.shape == (3, 4) and int((r.score_i2t > -100).sum()) == 3 * 2


def test_train_two_steps_with_blip(tiny_dir, blip_host, tmp_path):
    from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train

    cfg = tiny_config(tiny_dir, "tiny_z", head="blip_frozen")
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
    from prismkit.blip.frozen import text_hash

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
