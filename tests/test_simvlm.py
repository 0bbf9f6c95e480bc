"""SimVLM plugin: ResNet conv tokenizer, prefix-LM objective, prefix generation, training."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from helpers import tiny_config
from safetensors.torch import save_file

from prismkit import hookimpl
from prismkit.core.config import ConfigError, ModelConfig, resolve_config
from prismkit.core.data import DataError
from prismkit.core.generation import BeamConfig
from prismkit.core.heads import IGNORE
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.model import PrismerModel, create_model
from prismkit.core.processor import Processor
from prismkit.engine.batching import batch_indices
from prismkit.engine.evaluate import Predictor
from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train
from prismkit.simvlm import plugin as simvlm_plugin
from prismkit.simvlm.data import TextCorpus, word_chunks
from prismkit.simvlm.decoders import JointDecoder, PrefixDecoder
from prismkit.simvlm.generation import prefix_caption, prefix_vqa
from prismkit.simvlm.objective import (
    PrefixLMObjective,
    first_tokens,
    sample_prefix_len,
    split_prefix,
)
from prismkit.simvlm.stems import ResNet152StagesStem, ResNetStagesStem, resnet_trunk_filter

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class ResNet18Stages(ResNetStagesStem):
    """A small registered variant (256 channels) for end-to-end tests."""

    name = "resnet18_stages"
    default_arch = "resnet18"
    default_pretrained = None


class TinyStemPlugin:
    __name__ = "tiny_stem_plugin"

    @hookimpl
    def register_image_stems(self, register):
        register(ResNet18Stages)


def simvlm_host(*extra: object) -> PluginHost:
    """The installed plugins, plus the SimVLM module while its entry point is not installed."""
    installed = "prefix_lm" in get_plugin_manager().heads
    return get_plugin_manager(extra_plugins=[*([] if installed else [simvlm_plugin]), *extra])


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A whole timm resnet18 checkpoint (non-trivial BN statistics) saved as safetensors."""
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def model(tiny_dir) -> PrismerModel:
    cfg = tiny_config(tiny_dir, "tiny_z", head="prefix_lm")
    m = create_model(cfg, simvlm_host())
    m.eval()
    return m


def _batch(b: int = 3, t: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded text with BOS (id 2); labels -100 on BOS, a 2-token prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, t), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :3] = IGNORE
    images = torch.rand(b, 3, 32, 32, generator=g)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


# -- stem ---------------------------------------------------------------------------------------
def test_stem_grid_and_channels():
    stem = ResNetStagesStem(width=24, arch="resnet18")
    assert stem.out_channels == 256 and stem.proj.in_channels == 256
    assert stem(torch.randn(2, 3, 64, 48)).shape == (2, 24, 4, 3)
    base, large = ResNetStagesStem(width=8), ResNet152StagesStem(width=8)
    assert (base.arch, base.out_channels) == ("resnet101", 1024)
    assert (large.arch, large.out_channels) == ("resnet152", 1024)
    assert not hasattr(base, "layer4") and not hasattr(base, "fc")
    with pytest.raises(ValueError, match="stride 16"):
        ResNetStagesStem(width=8, patch_size=8, arch="resnet18")


def test_frozen_trunk_keeps_batchnorm_statistics():
    stem = ResNetStagesStem(width=8, arch="resnet18")
    stem.requires_grad_(False)
    for m in stem.always_trainable():
        m.requires_grad_(True)
    stem.train()
    bns = [m for m in stem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and stem.proj.training
    before = stem.bn1.running_mean.clone()
    stem(torch.randn(2, 3, 32, 32)).sum().backward()
    torch.testing.assert_close(stem.bn1.running_mean, before)
    assert stem.proj.weight.grad is not None and stem.conv1.weight.grad is None
    stem.requires_grad_(True).train()  # a trainable trunk updates its statistics
    assert all(m.training for m in bns)


def test_trunk_filter_keeps_stem_and_three_stages():
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    kept = resnet_trunk_filter(state)
    assert {k.split(".")[0] for k in kept} == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert set(state) - set(kept) == {k for k in state if k.startswith(("layer4.", "fc."))}


def test_load_pretrained_safetensors_round_trip(resnet18_file):
    path, state = resnet18_file
    stem = ResNetStagesStem(width=8, arch="resnet18").eval()
    proj = {k: v.clone() for k, v in stem.proj.state_dict().items()}
    stem.load_pretrained(str(path))
    loaded = stem.state_dict()
    for k, v in resnet_trunk_filter(state).items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    for k, v in proj.items():  # the new projection is not in the checkpoint and is kept
        torch.testing.assert_close(loaded["proj." + k], v, rtol=0, atol=0)
    net = timm.create_model("resnet18", pretrained=False).eval()
    net.load_state_dict(state)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = net.layer3(net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x)))))))
        torch.testing.assert_close(stem(x), stem.proj(feats))


def test_load_pretrained_rejects_wrong_files(resnet18_file, tmp_path):
    path, _ = resnet18_file
    with pytest.raises(RuntimeError):  # a resnet18 checkpoint does not fit resnet34's trunk
        ResNetStagesStem(width=8, arch="resnet34").load_pretrained(str(path))
    with pytest.raises(FileNotFoundError):
        ResNetStagesStem(width=8, arch="resnet18").load_pretrained(str(tmp_path / "none.pt"))


# -- prefix LM ----------------------------------------------------------------------------------
def test_split_points_drawn_after_the_prompt_image_only_prefix_included():
    # rows: [BOS p p t t t EOS] (prompt 2, n = 4 targets), [BOS t EOS] (n = 2),
    # [BOS p EOS] (n = 1), [BOS p p] (no targets), [pad pad BOS p t EOS] (left-padded, n = 2)
    mask = torch.tensor(
        [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
        + [[0, 0, 1, 1, 1, 1, 0]]
    )
    labels = torch.full_like(mask, IGNORE)
    labels[0, 3:7] = 9
    labels[1, 1:3] = 9
    labels[2, 2] = 9
    labels[4, 4:6] = 9
    draws = torch.stack(
        [sample_prefix_len(mask, labels, torch.Generator().manual_seed(s)) for s in range(1200)]
    )
    counts = torch.bincount(draws[:, 0], minlength=8)
    # BOS + prompt always in the prefix; 0..3 caption tokens after it, uniformly (3 = image only)
    assert counts[:3].sum() == 0 and counts[7:].sum() == 0
    assert counts[3:7].min() > 1200 / 4 * 0.8
    assert set(draws[:, 1].tolist()) == {1, 2}  # no prompt: BOS alone (image-only) or + 1 token
    assert (draws[:, 2] == 2).all()  # one target (EOS): the prefix is BOS + prompt
    assert (draws[:, 3] == 3).all()  # no target: all prefix
    assert set(draws[:, 4].tolist()) == {2, 3}  # padding does not count
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sample_prefix_len(mask, labels, g1), sample_prefix_len(mask, labels, g2))


def test_caption_batch_split_never_cuts_the_prompt(tiny_dir):
    processor = Processor.from_config(tiny_config(tiny_dir, "tiny_z"))
    batch = processor.encode(["a picture of"] * 2, ["a red circle", "a blue shape in the image"])
    prompt = 1 + len(processor.tokenizer("a picture of", add_special_tokens=False)["input_ids"])
    for seed in range(50):
        pl = sample_prefix_len(
            batch["attention_mask"], batch["labels"], torch.Generator().manual_seed(seed)
        )
        assert (pl >= prompt).all() and (pl < batch["attention_mask"].sum(1)).all()


@torch.no_grad()
def test_prefix_attends_bidirectionally_suffix_causally(model):
    lang = model.language
    ids = torch.randint(5, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    vision = torch.randn(1, 5, 32)
    prefix = torch.tensor([4])

    def changed(pos: int, prefix_len: torch.Tensor | None) -> list[bool]:
        other = ids.clone()
        other[0, pos] = (other[0, pos] + 1) % 60 + 5
        a, _ = lang(ids, vision, prefix_len=prefix_len)
        b, _ = lang(other, vision, prefix_len=prefix_len)
        return [not torch.allclose(a[0, i], b[0, i], atol=1e-6) for i in range(8)]

    assert changed(3, prefix) == [True] * 8  # the last prefix token reaches the first one
    assert changed(4, prefix) == [False] * 4 + [True] * 4  # the suffix never reaches the prefix
    assert changed(6, prefix) == [False] * 6 + [True] * 2  # ... nor earlier suffix tokens
    assert changed(3, None) == [False] * 3 + [True] * 5  # causal without a prefix


@torch.no_grad()
def test_loss_only_on_suffix_and_split_is_seeded(model):
    batch = _batch()
    prefix = torch.tensor([5, 4, 6])
    obj = PrefixLMObjective(label_smoothing=0.1)
    base, parts = obj(model, **batch, prefix_len=prefix)
    assert torch.isfinite(base) and torch.equal(parts["prefix_lm"], base)
    in_prefix = batch["labels"].clone()
    in_prefix[0, 4] = 7  # position 4 < prefix 5: not learned
    loss, _ = obj(model, **(batch | {"labels": in_prefix}), prefix_len=prefix)
    torch.testing.assert_close(loss, base, rtol=0, atol=0)
    in_suffix = batch["labels"].clone()
    in_suffix[0, 6] = (in_suffix[0, 6] + 1) % 60 + 5
    loss, _ = obj(model, **(batch | {"labels": in_suffix}), prefix_len=prefix)
    assert not torch.allclose(loss, base)
    seeded, _ = PrefixLMObjective(seed=3)(model, **batch)
    drawn = sample_prefix_len(
        batch["attention_mask"], batch["labels"], torch.Generator().manual_seed(3)
    )
    explicit, _ = obj(model, **batch, prefix_len=drawn)
    torch.testing.assert_close(seeded, explicit)


def test_text_only_batch_trains_the_language_side(model):
    batch = _batch()
    model.zero_grad(set_to_none=True)
    loss = model(None, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    lang = model.language
    for name, p in lang.named_parameters():
        if p.requires_grad:  # cross-attention is skipped; every other trainable part learns
            assert (p.grad is None) == (".cross_" in name), name
    layer = lang.layers[0]
    for p in (lang.word_embeddings.weight, lang.head.bias, layer.adaptor.up.weight):
        assert p.grad.abs().sum() > 0  # the adaptor is identity at init: only `up` moves first
    assert all(p.grad is None for p in model.vision.parameters())
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_mixed_batch_is_the_token_weighted_mean_of_both_passes(model):
    batch, prefix = _batch(), torch.tensor([3, 2, 4])
    obj = PrefixLMObjective()
    mixed, _ = obj(model, **batch, prefix_len=prefix, has_image=torch.tensor([True, False, True]))
    rows = torch.tensor([0, 2])
    img, _ = obj(model, **{k: v[rows] for k, v in batch.items()}, prefix_len=prefix[rows])
    txt_batch = {k: v[1:2] for k, v in batch.items()} | {"images": None}
    txt, _ = obj(model, **txt_batch, prefix_len=prefix[1:2])
    real = batch["attention_mask"].cumsum(1) - 1
    targets = (batch["labels"] != IGNORE) & (real >= prefix[:, None])
    n_img, n_txt = int(targets[rows].sum()), int(targets[1].sum())
    torch.testing.assert_close(mixed, (img * n_img + txt * n_txt) / (n_img + n_txt))
    none, _ = obj(model, **batch, prefix_len=prefix, has_image=torch.zeros(3, dtype=torch.bool))
    absent, _ = obj(model, **(batch | {"images": None}), prefix_len=prefix)
    torch.testing.assert_close(none, absent)
    with pytest.raises(ValueError, match="has_image"):
        obj(model, **(batch | {"images": None}), has_image=torch.ones(3, dtype=torch.bool))


# -- joint encoder (the paper's encoder-decoder) ------------------------------------------------
@pytest.fixture(scope="module")
def joint(tiny_dir) -> PrismerModel:
    """tiny_z as SimVLM's encoder-decoder; a random 16-wide ViT so the prefix is projected."""
    cfg = tiny_config(tiny_dir, "tiny_z", head="prefix_lm", head_options={"joint_encoder": True})
    cfg.vision.pretrained, cfg.vision.frozen, cfg.vision.width = None, False, 16
    torch.manual_seed(0)
    m = create_model(cfg, simvlm_host())
    lang = m.language
    for layer in lang.layers:  # zero-initialised cross-attention would hide the encoder
        torch.nn.init.normal_(layer.cross_attn.out_proj.weight, std=0.2)
    return m.eval()


def test_split_prefix_packs_left_and_right_padded_rows():
    ids = torch.tensor([[2, 5, 6, 7, 8, 3], [0, 0, 2, 9, 10, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, IGNORE, 6, 7, 8, 3], [IGNORE] * 3 + [9, 10, 3]])
    split = split_prefix(ids, mask, labels, torch.tensor([3, 1]))
    assert split.enc_ids.tolist() == [[2, 5, 6], [2, 0, 0]]
    assert split.enc_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert split.dec_ids.tolist() == [[2, 7, 8, 3], [2, 9, 10, 3]]
    assert split.dec_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert split.dec_labels.tolist() == [[IGNORE, 7, 8, 3], [IGNORE, 9, 10, 3]]
    assert first_tokens(ids, mask).tolist() == [[2], [2]]


def test_joint_head_has_its_projection_and_it_trains(joint):
    obj = joint.objective
    assert obj.joint_encoder and isinstance(obj.text_proj, torch.nn.Linear)
    assert (obj.text_proj.in_features, obj.text_proj.out_features) == (32, 16)
    assert all(p.requires_grad for p in obj.parameters())


@torch.no_grad()
def test_joint_encoder_is_bidirectional_over_image_and_prefix(joint):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 32, 32, generator=g)
    ids = torch.randint(5, 60, (1, 4), generator=g)
    mask = torch.ones_like(ids)
    obj = joint.objective
    memory, memory_mask = obj.encode(joint, images, None, ids, mask)
    n_img = memory.shape[1] - 4
    assert n_img == 16 and memory_mask.tolist() == [[1] * (n_img + 4)]
    other = ids.clone()
    other[0, 3] += 1  # the last prefix token reaches every image token and the first text one
    changed, _ = obj.encode(joint, images, None, other, mask)
    assert not torch.isclose(changed, memory, atol=1e-6).all(-1).any()
    brighter, _ = obj.encode(joint, images * 0.5, None, ids, mask)
    assert not torch.isclose(brighter[:, n_img:], memory[:, n_img:], atol=1e-6).all(-1).any()
    padded, pmask = obj.encode(  # a padded prefix position is hidden from every other token
        joint,
        images,
        None,
        torch.cat([ids, ids[:, :1] + 7], 1),
        torch.cat([mask, mask[:, :1] * 0], 1),
    )
    torch.testing.assert_close(padded[:, :-1], memory, rtol=1e-5, atol=1e-5)
    assert pmask[0, -1] == 0


@torch.no_grad()
def test_joint_loss_is_padding_free_and_only_on_the_suffix(joint):
    batch = _batch(b=3, t=9, seed=5)
    batch["images"] = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prefix = torch.tensor([4, 3, 5])
    obj = joint.objective
    loss, _ = obj(joint, **batch, prefix_len=prefix)
    # the batched loss is the token-weighted mean of each row run alone (no padding anywhere)
    total, count = 0.0, 0
    for r in range(3):
        n = int(batch["attention_mask"][r].sum())
        row = {k: v[r : r + 1, :n] if v.dim() == 2 else v[r : r + 1] for k, v in batch.items()}
        part, _ = obj(joint, **row, prefix_len=prefix[r : r + 1])
        k = int((row["labels"][0, prefix[r] :] != IGNORE).sum())
        total, count = total + part * k, count + k
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)
    in_prefix = batch["labels"].clone()
    in_prefix[0, 3] = 7  # position 3 < prefix 4: an encoder token, not learned
    same, _ = obj(joint, **(batch | {"labels": in_prefix}), prefix_len=prefix)
    torch.testing.assert_close(same, loss, rtol=0, atol=0)
    # the decoder reads the prefix only through the encoder: a prefix token change moves the loss
    ids = batch["input_ids"].clone()
    ids[0, 3] = (ids[0, 3] + 1) % 60 + 5
    moved, _ = obj(joint, **(batch | {"input_ids": ids}), prefix_len=prefix)
    assert not torch.allclose(moved, loss)


def test_joint_text_only_rows_and_mixed_batches(joint):
    batch, prefix = _batch(seed=6), torch.tensor([3, 2, 4])
    obj = joint.objective
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed, _ = obj(joint, **batch, prefix_len=prefix, has_image=has)
        only = batch | {"images": batch["images"][[0, 2]]}  # images of the image rows only
        same, _ = obj(joint, **only, prefix_len=prefix, has_image=has)
    torch.testing.assert_close(mixed, same, rtol=0, atol=0)
    joint.zero_grad(set_to_none=True)
    text = batch | {"images": None}
    loss, _ = obj(joint, **text, prefix_len=prefix)
    loss.backward()  # the encoder reads the text alone: the vision transformer and projection learn
    assert joint.vision.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert obj.text_proj.weight.grad.abs().sum() > 0
    assert joint.vision.stem.proj.weight.grad is None
    joint.zero_grad(set_to_none=True)


@torch.no_grad()
def test_joint_generation_cached_equals_uncached_and_predictor_uses_it(joint, tiny_dir):
    processor = Processor.from_config(joint.config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cfg = BeamConfig(beams=2, max_length=5, min_length=2)
    questions = ["what color?", "is there a red shape in the image?"]  # different prompt lengths
    answers = prefix_vqa(joint, processor, images, questions, cfg=cfg)
    uncached = BeamConfig(beams=2, max_length=5, min_length=2, use_cache=False)
    assert prefix_vqa(joint, processor, images, questions, cfg=uncached) == answers
    predictor = Predictor(joint, processor, lambda pixels, ids: {})
    caps = prefix_caption(joint, processor, images, cfg=cfg)
    assert predictor.caption(images, "a picture of", cfg) == caps
    # the decoder starts from BOS; the left-padded prompt lives in the encoder, masked
    p = processor.prompts(questions)
    dec, memory, ids, mask = joint.objective.generation_inputs(
        joint, images, None, p["input_ids"], p["attention_mask"]
    )
    assert isinstance(dec, JointDecoder) and ids.tolist() == [[processor.bos]] * 2
    assert memory.shape[1] == 16 + p["input_ids"].shape[1]
    h1, cache = dec(ids, memory, mask)
    for r in range(2):  # each row as if alone (no padding): the padded prompt is hidden
        alone = processor.prompts(questions[r : r + 1])
        row, _ = joint.objective.encode(
            joint, images[r : r + 1], None, alone["input_ids"], alone["attention_mask"]
        )
        h2, _ = joint.language(ids[r : r + 1], row, mask[r : r + 1])
        torch.testing.assert_close(h1[r : r + 1], h2, rtol=1e-5, atol=1e-5)
    nxt = torch.tensor([[7], [9]])
    step, _ = dec(nxt, None, torch.ones_like(nxt), cache=cache)
    full, _ = JointDecoder(joint.language, dec.memory_mask)(
        torch.cat([ids, nxt], 1), memory, torch.ones(2, 2, dtype=torch.long)
    )
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


# -- generation ---------------------------------------------------------------------------------
@torch.no_grad()
def test_prefix_decoder_cache_matches_full_recompute(model):
    lang = model.language
    ids = torch.randint(5, 60, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left-padded prompt
    vision = torch.randn(2, 5, 32)
    dec = PrefixDecoder(lang)
    first, cache = dec(ids, vision, mask)
    torch.testing.assert_close(first, lang(ids, vision, mask, prefix_len=mask.sum(1))[0])
    assert not torch.allclose(first[:, 0], lang(ids, vision, mask)[0][:, 0])
    nxt = torch.tensor([[7], [9]])
    step, _ = dec(nxt, None, torch.ones_like(nxt), cache=cache)
    full, _ = lang(
        torch.cat([ids, nxt], 1),
        vision,
        torch.cat([mask, torch.ones_like(nxt)], 1),
        prefix_len=mask.sum(1),
    )
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_prefix_caption_and_vqa(model, tiny_dir):
    processor = Processor.from_config(model.config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cfg = BeamConfig(beams=2, max_length=5, min_length=2, new_tokens=True)
    caps = prefix_caption(model, processor, images, cfg=cfg)
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
    uncached = BeamConfig(beams=2, max_length=5, min_length=2, new_tokens=True, use_cache=False)
    assert prefix_caption(model, processor, images, cfg=uncached) == caps
    predictor = Predictor(model, processor, lambda pixels, ids: {})
    assert prefix_caption(predictor, processor, images, cfg=cfg) == caps
    answers = prefix_vqa(model, processor, images, ["what color?", "what shape?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# -- through the registry -----------------------------------------------------------------------
def _resnet_config(tiny_dir: Path, stem_file: Path, clip: bool) -> ModelConfig:
    """tiny_z with the prefix-LM head and the resnet18 tokenizer (stride 16: a 2x2 grid)."""
    cfg = tiny_config(tiny_dir, "tiny_z", head="prefix_lm")
    cfg.vision.stem, cfg.vision.patch_size = "resnet18_stages", 16
    cfg.vision.stem_pretrained = str(stem_file)
    cfg.vision.mean, cfg.vision.std = IMAGENET["mean"], IMAGENET["std"]
    if not clip:  # SimVLM trains its transformer from scratch (like offline_default's ViT)
        cfg.vision.pretrained, cfg.vision.frozen = None, False
    return cfg


def test_clip_weights_load_beside_a_batchnorm_stem(tiny_dir, resnet18_file):
    create_model(
        _resnet_config(tiny_dir, resnet18_file[0], clip=True), simvlm_host(TinyStemPlugin())
    )


def test_train_three_steps_through_the_registry(tiny_dir, tmp_path, resnet18_file):
    host = simvlm_host(TinyStemPlugin())
    assert host.heads.get("prefix_lm") is PrefixLMObjective
    assert host.image_stems.get("resnet_stages") is ResNetStagesStem
    assert host.image_stems.get("resnet152_stages") is ResNet152StagesStem
    cfg = _resnet_config(tiny_dir, resnet18_file[0], clip=False)
    built = create_model(cfg, host)
    assert isinstance(built.objective, PrefixLMObjective)
    stem = built.vision.stem
    trainable = {id(p) for p in stem.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in stem.proj.parameters()}
    torch.testing.assert_close(stem.conv1.weight, resnet18_file[1]["conv1.weight"])
    t = TrainConfig(
        steps=3, batch_size=4, lr=3e-3, warmup=1, eval_questions=0, out_dir=str(tmp_path)
    )
    run = RunConfig(data=DataConfig(dataset="easyvqa", fraction=0.05), train=t)
    result = train(cfg, run, host)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert result["steps"] == 3 and math.isfinite(result["final_loss"])
    assert (tmp_path / "model.safetensors").exists()


# -- text-only data in the training loop --------------------------------------------------------
def test_text_corpus_reader(tmp_path):
    path = tmp_path / "c4.txt"
    path.write_text("a red circle on a mat\n\n   \none two three four five six seven\n")
    data = TextCorpus(path=str(path), chunk_words=3)
    assert [s.target for s in data] == [
        "a red circle",
        "on a mat",
        "one two three",
        "four five six",
        "seven",
    ]
    assert all(s.image is None and s.prompt == "" for s in data) and data.task == "text"
    assert len(TextCorpus(path=str(path))) == 2 and word_chunks("  ", 4) == []
    with pytest.raises(DataError, match="text-only"):
        data.image(0)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match="line 2 is not UTF-8"):
        TextCorpus(path=str(bad))
    with pytest.raises(DataError, match="does not exist"):
        TextCorpus(path=str(tmp_path / "none.txt"))


def test_text_stream_has_its_own_order():
    cfg = TrainConfig(batch_size=4, seed=0)
    a = batch_indices(3, 0, 0, 1, cfg, 50, per=3)
    b = batch_indices(3, 0, 0, 1, cfg, 50, per=1, stream=1)
    assert len(a) == 3 and len(b) == 1
    assert batch_indices(3, 0, 0, 1, cfg, 50) == batch_indices(3, 0, 0, 1, cfg, 50, per=4)
    # the text stream walks its own permutations: one epoch of 50 covers every text sample once
    epoch = [i for s in range(10) for i in batch_indices(s, 0, 0, 1, cfg, 50, 5, 1)]
    assert sorted(epoch) == list(range(50)) and epoch != list(range(50))
    assert epoch != [i for s in range(10) for i in batch_indices(s, 0, 0, 1, cfg, 50, 5)]


def test_training_loop_mixes_text_only_samples(tiny_dir, tmp_path, monkeypatch):
    corpus = tmp_path / "c4.txt"
    words = ["alpha", "beta", "gamma", "delta"]
    corpus.write_text("\n".join(f"the {w} text line number {i}" for i, w in enumerate(words)))
    seen = []
    forward = PrefixLMObjective.forward

    def spy(self, model, **kw):
        seen.append((kw["images"], kw["has_image"], kw["input_ids"].shape[0]))
        return forward(self, model, **kw)

    monkeypatch.setattr(PrefixLMObjective, "forward", spy)
    cfg = tiny_config(tiny_dir, "tiny_z", head="prefix_lm", head_options={"joint_encoder": True})
    t = TrainConfig(
        steps=2, batch_size=4, grad_accum=2, warmup=1, eval_questions=0, out_dir=str(tmp_path / "r")
    )
    data = DataConfig(
        dataset="easyvqa_captions",
        fraction=0.02,
        text_dataset="text_corpus",
        text_options={"path": str(corpus)},
        text_ratio=0.25,
    )
    result = train(cfg, RunConfig(data=data, train=t), simvlm_host())
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    assert len(seen) == 4  # 2 steps x 2 micro-batches
    for images, has_image, b in seen:
        assert b == 4 and has_image.tolist() == [True, True, True, False]
        assert images.shape[0] == 3  # only the rows with an image are decoded and encoded
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert set(log[0]["parts"]) == {"prefix_lm"}
    # a head that cannot train on text alone is refused, naming the field
    lm = tiny_config(tiny_dir, "tiny_z")
    with pytest.raises(ConfigError, match="text-only samples"):
        train(
            lm, RunConfig(data=data, train=replace(t, out_dir=str(tmp_path / "r2"))), simvlm_host()
        )
    bad = DataConfig(dataset="easyvqa_captions", text_dataset="text_corpus", text_ratio=0.01)
    with pytest.raises(ConfigError, match="data.text_ratio"):
        train(
            cfg, RunConfig(data=bad, train=replace(t, out_dir=str(tmp_path / "r3"))), simvlm_host()
        )


# -- simvlm_base from scratch -------------------------------------------------------------------
def test_simvlm_base_is_the_paper_layout_all_trainable():
    host = simvlm_host()
    cfg = resolve_config(host, "simvlm_base")
    assert cfg.vision.pretrained is None and cfg.language.pretrained is None
    assert cfg.vision.stem_pretrained == "none" and cfg.head_options == {"joint_encoder": True}
    with torch.device("meta"):
        m = PrismerModel.from_config(cfg, host)
    assert m.parameter_counts() == {"trainable": 266_594_969, "frozen": 0, "total": 266_594_969}
    assert len(m.language.layers) == 12 and m.language.output_layer is None  # the paper's 12
    assert all(isinstance(layer.adaptor, torch.nn.Identity) for layer in m.language.layers)
    assert m.vision.stem.arch == "resnet101" and m.objective.joint_encoder
    pre = resolve_config(host, "simvlm_pretrained_base")
    assert pre.vision.pretrained and pre.language.pretrained and pre.language.frozen


def _scratch_config(tiny_dir: Path) -> ModelConfig:
    """simvlm_base at tiny shapes (a resnet18 tokenizer, a 1-layer encoder and decoder)."""
    return resolve_config(
        simvlm_host(TinyStemPlugin()),
        "simvlm_base",
        [
            'vision.stem="resnet18_stages"',
            "vision.image_size=32",
            "vision.width=16",
            "vision.layers=1",
            "vision.heads=2",
            'language.backbone="bert"',
            f'language.tokenizer="{tiny_dir / "bert"}"',
            "language.vocab_size=128",
            "language.width=32",
            "language.layers=1",
            "language.heads=2",
            "language.intermediate=64",
            "language.max_positions=64",
            "language.type_vocab_size=2",
            "max_text_len=24",
        ],
    )


def test_simvlm_base_trains_from_scratch_and_round_trips(tiny_dir, tmp_path, monkeypatch):
    from prismkit.core import weights
    from prismkit.core.checkpoint import load_checkpoint, save_checkpoint

    host = simvlm_host(TinyStemPlugin())
    cfg = _scratch_config(tiny_dir)

    def no_reads(source):  # nothing pretrained: no weights file is resolved
        raise AssertionError(f"from scratch, but {source!r} was read")

    monkeypatch.setattr(weights, "resolve", no_reads)
    torch.manual_seed(0)
    model = create_model(cfg, host)  # pretrained=True: reads what the config names, i.e. nothing
    monkeypatch.undo()
    assert model.parameter_counts()["frozen"] == 0
    stem = model.vision.stem
    before = stem.bn1.running_mean.clone()
    processor = Processor.from_config(cfg)
    batch = processor.encode(["a picture of"] * 4, ["a red circle", "a blue square"] * 2)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(images, **batch, prefix_len=torch.full((4,), 4)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(stem.bn1.running_mean, before)  # the trunk's statistics train too
    assert all(p.grad is not None for p in stem.parameters())
    path = tmp_path / "scratch.safetensors"
    save_checkpoint(model, path, host)
    loaded = load_checkpoint(path, host)
    own = model.state_dict()
    for k, v in loaded.state_dict().items():  # every weight and BN statistic came back
        torch.testing.assert_close(v, own[k], rtol=0, atol=0, msg=k)
    model.eval()
    with torch.no_grad():
        a = model(images, batch["input_ids"], batch["attention_mask"]).logits
        b = loaded.eval()(images, batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    t = TrainConfig(steps=2, batch_size=4, warmup=1, eval_questions=4, out_dir=str(tmp_path / "r"))
    run = RunConfig(data=DataConfig(dataset="easyvqa_captions", fraction=0.02), train=t)
    result = train(cfg, run, host)  # the standard loop, its evaluation through the joint decoder
    assert result["steps"] == 2 and set(result["eval"]) >= {"bleu4", "cider"}
