"""The model battery on tiny configs: forward, backward, trainable set, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import batch_for, tiny_config

from prismkit.core.model import PrismerModel, SemanticInput, create_model


def test_forward_backward_reaches_exactly_the_trainable_parameters(host, tiny_cfg):
    model = create_model(tiny_cfg, host)
    batch = batch_for(model)
    out = model(**batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"


def expected_trainable(model: PrismerModel, prismerz: bool) -> set[str]:
    """The reference's pre-training set (``freeze_lang_vision``), written out name by name for the
    tiny config: the ViT blocks' attention, MLP and ln_1/ln_2 and the language layers'
    self-attention and feed-forward (with their LayerNorms) are frozen; the RGB patch conv,
    positions, ln_pre/ln_post, adaptors, cross-attention, the output layer, embeddings, the LM
    head, expert stems, resampler and instance embeddings train."""
    names = {
        "vision.position_embedding",
        "vision.stem.proj.weight",
        "vision.pre_layrnorm.weight",
        "vision.pre_layrnorm.bias",
        "vision.post_layernorm.weight",
        "vision.post_layernorm.bias",
    }
    for i in range(2):
        for part in ("adaptor.norm", "adaptor.down", "adaptor.up"):
            names |= {f"vision.layers.{i}.{part}.weight", f"vision.layers.{i}.{part}.bias"}
        for part in (
            "cross_attn.q_proj",
            "cross_attn.k_proj",
            "cross_attn.v_proj",
            "cross_attn.out_proj",
            "cross_norm",
            "adaptor.norm",
            "adaptor.down",
            "adaptor.up",
        ):
            names |= {f"language.layers.{i}.{part}.weight", f"language.layers.{i}.{part}.bias"}
    names |= {n for n, _ in model.named_parameters() if n.startswith("language.output_layer.")}
    assert any(n.startswith("language.output_layer.self_attn") for n in names)
    names |= {
        "language.word_embeddings.weight",
        "language.position_embeddings.weight",
        "language.token_type_embeddings.weight",
        "language.embed_norm.weight",
        "language.embed_norm.bias",
        "language.head.dense.weight",
        "language.head.dense.bias",
        "language.head.norm.weight",
        "language.head.norm.bias",
        "language.head.bias",
    }
    if not prismerz:
        names |= {
            n for n, _ in model.named_parameters() if n.startswith(("expert_stems.", "resampler."))
        }
        assert any(n.startswith("expert_stems.edge.") for n in names)
        assert "resampler.latents" in names
    return names


@pytest.mark.parametrize("name", ["tiny", "tiny_z"])
def test_exact_trainable_set(host, tiny_dir, name):
    model = create_model(tiny_config(tiny_dir, name), host)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, prismerz=name == "tiny_z")
    if name == "tiny_z":
        assert model.resampler is None and len(model.expert_stems) == 0


def test_finetune_unfreezes_the_language_model(host, tiny_cfg):
    model = create_model(tiny_cfg, host)
    model.freeze("finetune")
    lang = {n for n, p in model.named_parameters() if n.startswith("language.")}
    assert lang == {
        n for n, p in model.named_parameters() if n.startswith("language.") and p.requires_grad
    }
    assert not model.vision.layers[0].self_attn.q_proj.weight.requires_grad
    assert not model.vision.layers[0].layer_norm1.weight.requires_grad
    with pytest.raises(ValueError, match="stage"):
        model.freeze("everything")


def test_zero_init_adaptors_are_an_option(host, tiny_cfg):
    """The reference initialises its adaptors at random; ``adaptor.zero_init`` (an option) starts
    the pre-norm vision adaptors as the identity instead."""
    model = create_model(tiny_cfg, host)
    x = torch.randn(2, 5, 32)
    assert not torch.allclose(model.vision.layers[0].adaptor(x), x)
    tiny_cfg.adaptor.zero_init = True
    model = create_model(tiny_cfg, host)
    torch.testing.assert_close(model.vision.layers[0].adaptor(x), x)
    lang = model.language.layers[0].adaptor
    torch.testing.assert_close(lang(x), lang.norm(x))  # post-norm: LN(x + 0)


def test_instance_experts_get_instance_embeddings(host, tiny_dir):
    """An instance expert (the contract's ``instances``) gets one of 128 learned rows per
    instance id present in the batch, drawn at every forward; ``instance_rows`` replays a draw."""
    from helpers import FakeInstances

    cfg = tiny_config(tiny_dir, experts=["fake_instances"])
    model = create_model(cfg, host).eval()
    assert model.instance_embedding.shape == (128, 32)
    batch = batch_for(model)
    ids = batch["experts"]["fake_instances"].instances
    n = len(torch.unique(ids))
    rows = torch.arange(n)
    a = model.encode_image(batch["images"], batch["experts"], instance_rows=rows)
    b = model.encode_image(batch["images"], batch["experts"], instance_rows=rows)
    torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    c = model.encode_image(batch["images"], batch["experts"])
    torch.manual_seed(0)
    d = model.encode_image(batch["images"], batch["experts"])
    torch.testing.assert_close(c, d)  # reproducible from torch's generator
    assert FakeInstances.instances


def test_semantic_and_dependent_experts(host, tiny_dir):
    cfg = tiny_config(tiny_dir, experts=["edge", "fake_dense", "fake_semantic"])
    model = create_model(cfg, host)
    batch = batch_for(model)
    assert set(batch["experts"]) == {"edge", "fake_dense", "fake_semantic"}
    assert isinstance(batch["experts"]["fake_semantic"], SemanticInput)
    model(**batch).loss.backward()
    assert model.expert_stems["fake_semantic"].convs[0].weight.grad is not None


def test_expert_tokens_go_through_the_resampler(host, tiny_cfg):
    model = create_model(tiny_cfg, host)
    batch = batch_for(model)
    vision = model.encode_image(batch["images"], batch["experts"])
    grid = (32 // 8) ** 2  # no class token: the RGB patches, then the resampled latents
    assert vision.shape == (2, grid + tiny_cfg.resampler.latents, 32)


def test_bad_images_name_the_problem_and_the_fix(host, tiny_cfg):
    model = create_model(tiny_cfg, host)
    batch = batch_for(model)
    for bad, match in [
        (torch.rand(2, 3, 40, 40), "resize"),
        (torch.rand(2, 1, 32, 32), "grayscale"),
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "float"),
        (torch.rand(3, 32, 32), r"\(B, 3, 32, 32\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(**{**batch, "images": bad})
    with pytest.raises(ValueError, match="missing \\['edge'\\]"):
        model(**{**batch, "experts": {}})
    with pytest.raises(ValueError, match="expected \\(2, 1, H, W\\)"):
        model(**{**batch, "experts": {"edge": torch.rand(2, 3, 32, 32)}})


def test_prismerz_rejects_expert_inputs(host, tiny_dir):
    model = create_model(tiny_config(tiny_dir, "tiny_z"), host)
    batch = batch_for(model)
    with pytest.raises(ValueError, match="PrismerZ"):
        model(**{**batch, "experts": {"edge": torch.rand(2, 1, 32, 32)}})


def test_text_longer_than_the_language_model_is_refused(host, tiny_cfg):
    model = create_model(tiny_cfg, host)
    with pytest.raises(ValueError, match="limit of 64"):
        model.language(torch.full((1, 65), 5, dtype=torch.long), torch.randn(1, 3, 32))


def test_unknown_or_disabled_expert(tiny_dir):
    from prismkit.core.host import PluginError, PluginsConfig, get_plugin_manager

    with pytest.raises(PluginError, match="unknown experts 'nope'|unknown experts"):
        create_model(tiny_config(tiny_dir, experts=["nope"]), get_plugin_manager())
    only_seg = get_plugin_manager(PluginsConfig(plugins=None, experts=["seg_superpixel"]))
    with pytest.raises(PluginError, match="not enabled in plugins.toml; enabled: seg_superpixel"):
        create_model(tiny_config(tiny_dir), only_seg)


@pytest.mark.parametrize("stem", ["patch", "efficientnet_lite0"])
def test_every_image_stem(host, tiny_dir, stem):
    cfg = tiny_config(tiny_dir, "tiny_z")
    if stem != "patch":
        cfg.vision = dataclasses.replace(
            cfg.vision, stem=stem, patch_size=16, image_size=64, pretrained=None, frozen=False
        )
    model = create_model(cfg, host, pretrained=stem == "patch")
    batch = batch_for(model)
    model(**batch).loss.backward()
    grads = [p.grad is not None for p in model.vision.stem.parameters() if p.requires_grad]
    if stem == "patch":  # the RGB patch conv trains, as in the reference
        assert grads == [True]
    else:  # the frozen CNN's new projection trains
        assert grads and all(grads)


@pytest.mark.parametrize("backbone", ["bert", "roberta"])
def test_every_language_backbone(host, tiny_dir, backbone):
    cfg = tiny_config(tiny_dir, "tiny_z")
    if backbone == "roberta":
        cfg.language = dataclasses.replace(
            cfg.language, backbone="roberta", pretrained=str(tiny_dir / "roberta"), max_positions=66
        )
    model = create_model(cfg, host)
    model(**batch_for(model)).loss.backward()


def test_missing_weights_folder_is_named(host, tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir)
    cfg.language.pretrained = str(tmp_path / "no_such_folder")
    with pytest.raises(
        FileNotFoundError, match="language.pretrained = .*no_such_folder.*does not exist"
    ):
        create_model(cfg, host)


def test_expert_requirements_must_be_enabled(tiny_dir):
    from prismkit.core.host import PluginError, PluginsConfig, get_plugin_manager

    host = get_plugin_manager(PluginsConfig(plugins=None, experts=["normal", "edge"]))
    with pytest.raises(
        PluginError, match="expert 'normal' \\(plugin 'normals'\\) requires expert 'depth'"
    ):
        create_model(tiny_config(tiny_dir, experts=["normal"]), host)
