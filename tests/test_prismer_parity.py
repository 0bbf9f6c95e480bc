"""Prismer parity: numbers produced by the official NVlabs/prismer code (tests/fixtures/
prismer_reference, see its FORMAT.md) recomputed by prismkit through the converter.

The fixture run goes through the command users and other fixtures use:
``prismkit convert prismer --fixture DIR --out FILE``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prismkit.core.cli import main
from prismkit.core.convert import (
    ConversionError,
    Heads,
    convert_prismer,
    infer_config,
    prismer_key_map,
)
from prismkit.core.parity import load_fixture_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "prismer_reference"
# losses: 1e-5 relative; every other float: 1e-4 absolute; integers exactly
LOSSES = (
    "loss",
    "loss_per_sample",
    "loss_noprefix",
    "loss_per_sample_noprefix",
    "loss_per_sequence",
)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("parity") / "prismkit_outputs.safetensors"
    assert main(["convert", "prismer", "--fixture", str(FIXTURE), "--out", str(out)]) == 0
    return load_file(str(out))


def test_every_reference_output_matches(outputs):
    ref = load_file(str(FIXTURE / "outputs.safetensors"))
    assert set(outputs) == set(ref)
    for name, want in ref.items():
        got = outputs[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
        elif name.rpartition(".")[2] in LOSSES:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=name)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=name)


def test_key_map_is_pure_and_splits_packed_projections():
    sd = load_fixture_weights(FIXTURE)
    before = {k: v.clone() for k, v in sd.items()}
    out = prismer_key_map(sd, {"seg": "seg"})
    assert all(torch.equal(sd[k], before[k]) for k in sd)  # inputs untouched
    packed = sd["expert_encoder.transformer.resblocks.0.0.attn.in_proj_weight"]
    w = out["vision.layers.0.self_attn.q_proj.weight"]
    assert w.shape == (packed.shape[1], packed.shape[1]) and torch.equal(w, packed[: w.shape[0]])
    assert torch.equal(out["vision.layers.0.self_attn.v_proj.weight"], packed[2 * w.shape[0] :])
    assert "expert_stems.seg.convs.0.weight" in out and "expert_stems.seg.proj.weight" in out
    assert not any("decoder" in k or "position_ids" in k for k in out)  # tied / buffers dropped


def test_unknown_missing_and_untied_keys_are_named():
    sd = load_fixture_weights(FIXTURE)
    with pytest.raises(
        ConversionError, match=r"not part of the Prismer reference layout: \['extra.weight'\]"
    ):
        prismer_key_map({**sd, "extra.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["text_decoder.lm_head.decoder.bias"] = bad["text_decoder.lm_head.bias"] + 1
    with pytest.raises(ConversionError, match="not tied"):
        prismer_key_map(bad)
    from prismkit.core.convert import build_converted

    missing = {k: v for k, v in sd.items() if ".resampler.perceiver_blocks.3." not in k}
    cfg = infer_config(sd, heads=Heads(4, 4))
    with pytest.raises(ConversionError, match=r"missing \['resampler.layers.3"):
        build_converted(missing, cfg)


def test_config_comes_from_the_tensors():
    sd = load_fixture_weights(FIXTURE)
    cfg = infer_config(sd)
    ref = json.loads((FIXTURE / "config.json").read_text())
    assert cfg.experts == ["depth", "normal", "seg_coco", "edge", "obj_detection", "ocr_detection"]
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size) == (64, 2, 16)
    assert (
        cfg.vision.image_size == 224 and cfg.vision.heads == 64 // 64
    )  # width / 64, as the reference
    assert (cfg.language.width, cfg.language.layers) == (64, ref["roberta"]["num_hidden_layers"])
    assert cfg.language.intermediate == 128 and cfg.language.vocab_size == 50265
    assert (cfg.resampler.latents, cfg.resampler.layers) == (64, 4)
    assert cfg.instance_embeddings == 128 and cfg.language.output_layer
    # a grid the reference's fine-tuning resolution gives is read as that resolution
    big = dict(sd)
    big["expert_encoder.positional_embedding"] = torch.zeros(30 * 30, 64)
    assert infer_config(big).vision.image_size == 480
    no_experts = {k: v for k, v in sd.items() if "conv1." not in k or "conv1.rgb" in k}
    assert infer_config(no_experts).experts == []


def test_convert_an_official_state_dict_end_to_end(tmp_path):
    """A ``pytorch_model.bin`` as the reference saves it (torch.save of the state dict, the tied
    aliases included) -> ``convert`` -> ``load_checkpoint`` gives the reference's encoder output."""
    import prismkit

    sd = load_fixture_weights(FIXTURE)
    official = tmp_path / "caption_prismer_fixture" / "pytorch_model.bin"
    official.parent.mkdir()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, official)
    out = tmp_path / "converted"
    assert main(
        ["convert", "prismer", str(official), "--out", str(out), "--vision-heads", "4",
         "--language-heads", "4"]
    ) == 0  # fmt: skip
    assert (out / "config.toml").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_prismer(official, out, heads=Heads(4, 4))
    model = prismkit.load_checkpoint(out / "model.safetensors").eval()
    assert model.config.name == "caption_prismer_fixture"
    from prismkit.core.parity import fixture_inputs

    images, experts, rows = fixture_inputs(FIXTURE, model)
    with torch.no_grad():
        tokens = model.encode_image(images, experts, instance_rows=rows)
    ref = load_file(str(FIXTURE / "outputs.safetensors"))["encoder.out"]
    torch.testing.assert_close(tokens, ref, rtol=0, atol=1e-4)
    save_file({"x": torch.zeros(1)}, tmp_path / "not_prismer.safetensors")
    assert main(["convert", "prismer", str(tmp_path / "not_prismer.safetensors"), "--out",
                 str(tmp_path / "x")]) == 2  # fmt: skip


@pytest.mark.parametrize(
    ("name", "trainable", "total"),
    [
        ("prismer_base", 157_359_801, 327_468_729),  # counted from the reference code
        ("prismerz_base", 104_226_393, 274_335_321),
        ("prismer_large", 362_527_961, 967_146_713),  # 224 px, as pre-trained
        ("prismerz_large", 268_237_913, 872_856_665),
    ],
)
def test_parameter_counts_are_the_reference(name, trainable, total, capsys):
    assert main(["describe", name]) == 0
    out = capsys.readouterr().out
    assert f"{trainable:,}" in out and f"{total:,} parameters" in out
