"""BLIP parity with the reference (salesforce/BLIP run unmodified, tests/fixtures/blip_reference):
the fixture's weights go through the converter, and every output FORMAT.md describes is
recomputed by ``prismkit convert blip --fixture DIR --out FILE`` and compared: floats to 1e-4
absolute, losses to 1e-5 relative, ids exactly. Then the converter on a ``.pth`` checkpoint,
and ``prismkit caption`` / ``prismkit retrieval`` on converted checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prismkit.blip import convert
from prismkit.core.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "blip_reference"
CONFIG = json.loads((FIXTURE / "config.json").read_text())
HEADS = ["--vision-heads", "4", "--text-heads", "4"]  # not in the tensors; config.json has them


def _is_loss(name: str) -> bool:
    """A loss value (compared relatively); per-token diagnostics are compared absolutely."""
    last = name.rsplit(".", 1)[-1]
    return last.startswith("loss") and last != "loss_per_token"


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("parity") / "outputs.safetensors"
    assert main(["convert", "blip", "--fixture", str(FIXTURE), "--out", str(out)]) == 0
    return load_file(str(out))


def test_every_reference_output_matches(produced):
    ref = load_file(str(FIXTURE / "outputs.safetensors"))
    assert sorted(produced) == sorted(ref)
    bad = []
    for name, want in sorted(ref.items()):
        got = produced[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            bad.append(
                f"{name}: {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
            )
        elif not want.is_floating_point():
            if not torch.equal(got, want):
                bad.append(f"{name}: ids differ: {got.tolist()} vs {want.tolist()}")
        elif _is_loss(name):
            err = ((got - want).abs() / want.abs().clamp_min(1e-12)).max().item()
            if err > 1e-5:
                bad.append(f"{name}: relative error {err:.2e}")
        else:
            err = (got - want).abs().max().item()
            if err > 1e-4:
                bad.append(f"{name}: max abs error {err:.2e}")
    assert not bad, "\n".join(bad)


def test_the_losses_are_compared_as_losses():
    names = [n for n in load_file(str(FIXTURE / "outputs.safetensors")) if _is_loss(n)]
    assert sorted(names) == sorted(
        [
            "caption.loss", "caption.loss_sum_per_sample", "pretrain.loss_ita",
            "pretrain.loss_itm", "pretrain.loss_lm", "retrieval_train.loss_ita",
            "retrieval_train.loss_itm",
        ]
    )  # fmt: skip


def test_fixture_mode_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_text("mine")
    assert main(["convert", "blip", "--fixture", str(FIXTURE), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "mine"


# -- the key remapping --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    return convert.read_reference(FIXTURE / "weights.safetensors")


@pytest.mark.parametrize("task", ["blip_pretrain", "blip_retrieval", "blip_caption"])
def test_remapping_is_a_bijection_on_what_a_task_keeps(reference_state, task):
    ours = convert.from_reference(reference_state, task)
    back = convert.to_reference(ours, task)
    assert convert.from_reference({**reference_state, **back}, task).keys() == ours.keys()
    for ref_key, value in back.items():
        assert torch.equal(value, reference_state[ref_key]), ref_key
    if task == "blip_pretrain":  # tied weights once, the decoder's own self-attention kept
        assert "text_decoder.word_embeddings.weight" not in ours
        assert "text_decoder.layers.0.self_attn.q_proj.weight" in ours
        assert "text_decoder.layers.0.cross_attn.q_proj.weight" not in ours
        assert torch.equal(ours["queue_ptr"], torch.tensor([4]))
    if task == "blip_retrieval":
        assert torch.equal(ours["queue_ptr"], torch.tensor([2]))  # ptr_queue, not queue_ptr
    if task == "blip_caption":  # the decoder's own full copy
        assert (
            "text_decoder.layers.0.mlp.fc1.weight" in ours
            and "text_encoder.word_embeddings.weight" not in ours
        )


def test_key_rules():
    assert (
        convert.bert_key("encoder.layer.3.attention.output.LayerNorm.gamma")
        == "layers.3.self_attn.norm.weight"
    )
    assert convert.bert_key("encoder.layer.0.output.dense.bias") == "layers.0.mlp.fc2.bias"
    assert (
        convert.bert_key("encoder.layer.0.crossattention.self.key.weight")
        == "layers.0.cross_attn.k_proj.weight"
    )
    assert convert.bert_key("embeddings.token_type_embeddings.weight") is None
    assert convert.vit_key("patch_embed.proj.weight") == "patch_embed.weight"
    assert convert.lm_head_key("decoder.weight") is None
    with pytest.raises(convert.ConversionError, match="unknown BERT key"):
        convert.bert_key("encoder.layer.0.adapter.weight")


def test_a_decoder_that_is_not_tied_is_refused(reference_state):
    state = dict(reference_state)
    key = "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    state[key] = state[key] + 1.0
    with pytest.raises(convert.ConversionError, match="differs from text_encoder"):
        convert.from_reference(state, "blip_pretrain")
    convert.from_reference(state, "blip_caption")  # a captioner has its own decoder: fine
    decoder_only = {
        k: v for k, v in state.items() if k.startswith(("visual_encoder.", "text_decoder."))
    }
    assert convert.source_task(decoder_only) == "blip_caption"
    with pytest.raises(convert.ConversionError, match="cannot become a blip_pretrain"):
        convert.from_reference(decoder_only, "blip_pretrain")


# -- released-checkpoint files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pth(tmp_path_factory, reference_state) -> Path:
    """The fixture's weights as BLIP ships checkpoints: torch.save({'model': state_dict}), with
    the tied aliases present (a state_dict lists them) and an optimizer/config beside."""
    path = tmp_path_factory.mktemp("pth") / "model_tiny.pth"
    torch.save({"model": reference_state, "config": {"vit": "base"}, "epoch": 3}, path)
    return path


def test_converted_pth_gives_the_reference_itm_logits(pth, tmp_path):
    out = tmp_path / "retrieval.safetensors"
    assert (
        main(["convert", "blip", str(pth), "--task", "blip_retrieval", "--out", str(out), *HEADS])
        == 0
    )
    from prismkit.core.checkpoint import load_checkpoint

    model = load_checkpoint(out).eval()
    x = load_file(str(FIXTURE / "inputs.safetensors"))
    want = load_file(str(FIXTURE / "outputs.safetensors"))["itm.logits"]
    pi, pt = x["itm.pair_image_idx"], x["itm.pair_text_idx"]
    with torch.no_grad():
        embeds = model.image_embeds(x["image"])[pi]
        got = model.itm_logits(x["text.input_ids"][pt], x["text.attention_mask"][pt], embeds)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert main(["convert", "blip", str(pth), "--out", str(out)]) == 2  # never overwrites


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": np.float64(1.0).__class__}, path)
    with pytest.raises(convert.ConversionError, match="weights_only"):
        convert.read_reference(path)


def _fixture_images(folder: Path) -> list[Path]:
    x = load_file(str(FIXTURE / "inputs.safetensors"))
    paths = []
    for i, im in enumerate(x["image_u8"]):
        p = folder / f"image{i}.png"
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def test_caption_and_retrieval_commands_give_what_the_reference_gives(pth, tmp_path, capsys):
    images = _fixture_images(tmp_path)
    cap = tmp_path / "caption.safetensors"
    assert (
        main(["convert", "blip", str(pth), "--task", "blip_caption", "--out", str(cap), *HEADS])
        == 0
    )
    capsys.readouterr()
    assert main(["caption", str(cap), *map(str, images[:2])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = [line.split("\t", 1)[1] for line in lines]
    assert got == CONFIG["generation"]["generate"]["returned_strings"]

    ret = tmp_path / "retrieval.safetensors"
    assert (
        main(["convert", "blip", str(pth), "--task", "blip_retrieval", "--out", str(ret), *HEADS])
        == 0
    )
    data = tmp_path / "pairs.jsonl"
    texts, owner = CONFIG["texts"]["raw"], CONFIG["texts"]["text_image"]
    data.write_text(
        "".join(
            json.dumps({"image": str(images[i]), "caption": t}) + "\n"
            for t, i in zip(texts, owner, strict=True)
        )
    )
    metrics = tmp_path / "metrics.json"
    k = str(CONFIG["retrieval"]["k_test"])
    assert main(["retrieval", str(ret), str(data), "--k-test", k, "--out", str(metrics)]) == 0
    got = json.loads(metrics.read_text())
    for name, want in CONFIG["retrieval"]["metrics"].items():
        assert got[name] == pytest.approx(want, abs=1e-9), name
