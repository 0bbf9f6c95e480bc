"""Images of every kind in, model tensors out; text checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prismkit.core.processor import Processor, load_image


@pytest.fixture
def processor(tiny_dir, tiny_cfg):
    from transformers import AutoTokenizer

    return Processor(AutoTokenizer.from_pretrained(tiny_dir / "bert"), tiny_cfg)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_image_modes_become_rgb(tmp_path, processor, mode):
    img = Image.fromarray(
        (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    ).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    t = load_image(path)
    assert t.shape == (3, 20, 30) and t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    assert processor.images([path]).shape == (1, 3, 32, 32)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, 40, 20)


def test_corrupt_and_tiny_images(tmp_path, processor):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png: cannot be read"):
        load_image(bad)
    assert processor.images([np.zeros((1, 1, 3), np.uint8)]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        load_image(np.zeros((4, 4, 5), np.uint8))


def test_encode_masks_the_prompt_from_the_loss(processor):
    batch = processor.encode(["what color is the shape ?", "is there a circle ?"], ["red", "yes"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids[0, 0] == processor.bos and (labels[:, 0] == -100).all()
    for i in range(2):
        n = int(mask[i].sum())
        targets = labels[i, labels[i] != -100].tolist()
        assert targets[-1] == processor.eos and len(targets) == 2
        assert ids[i, n - 2 : n].tolist() == targets
    with pytest.raises(ValueError, match="empty target"):
        processor.encode(["q"], [" "])


def test_too_long_text_names_the_limit(processor):
    # text a user typed is refused, not cut (data captions are cut with truncate=True)
    with pytest.raises(
        ValueError, match="the model takes at most 24: shorten it or raise max_text_len"
    ):
        processor.encode(["a picture of"], ["what " * 40])


def test_captions_are_one_string_and_truncated_as_the_reference(processor):
    """``pre_caption(prompt + " " + caption)``: capitalised, punctuation to spaces, 30 words; the
    prompt (and BOS) carry no loss."""
    processor.config.max_text_len = 64
    assert (
        processor.caption_text("A picture of", "a DOG. on (grass)!")
        == "A picture of a dog on grass"
    )
    enc = processor.encode(["a picture of"], ["red circle"])
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == processor.bos and ids[-1] == processor.eos
    n_prompt = 1 + len(processor._ids("A picture of"))
    assert enc["labels"][0, :n_prompt].eq(-100).all()
    assert enc["labels"][0, n_prompt:].tolist() == ids[n_prompt:]
    long = processor.encode(["a picture of"], ["word " * 50], truncate=True)  # data, as training
    assert long["attention_mask"].sum() == processor.config.text.caption_tokens


def test_prompts_are_left_padded_and_decode_round_trips(processor):
    p = processor.prompts(["what color", "is there a red circle in the image"])
    assert p["attention_mask"][0, 0] == 0 and p["attention_mask"][0, -1] == 1
    ids = processor.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert processor.decode([*ids, processor.eos, 7, 8]) == "red circle"


@pytest.fixture(scope="module")
def roberta_processor(tmp_path_factory):
    """A small byte-level BPE tokenizer with RoBERTa's special tokens (<s>=0, <pad>=1, </s>=2)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from prismkit.core.config import ModelConfig

    corpus = [
        "A picture of a red circle",
        "a blue triangle in the image",
        "Is there a shape? Yes No",
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus * 20, vocab_size=320, min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )  # fmt: skip
    t = bpe._tokenizer
    t.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", cls_token="<s>",
        sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
    )  # fmt: skip
    return Processor(tok, ModelConfig())


def test_first_target_word_carries_its_space_with_byte_level_bpe(roberta_processor):
    """The reference tokenises "A picture of a red circle" as ONE string, so the first caption
    word is "Ġa" (with its space), not "a"; separately tokenised targets would lose it."""
    p = roberta_processor
    enc = p.encode(["A picture of"], ["a red circle"])
    ids = enc["input_ids"][0].tolist()
    assert ids == p.tokenizer("A picture of a red circle")["input_ids"]
    first = next(i for i, lab in enumerate(enc["labels"][0].tolist()) if lab != -100)
    assert p.tokenizer.convert_ids_to_tokens(ids[first]) == "Ġa"
    assert first == len(p.tokenizer("A picture of")["input_ids"]) - 1  # BOS + prompt masked
    # VQA: "<s>" + question, right-padded, then " Answer</s>" (leading space, capitalised)
    vqa = p.encode(
        ["is there a shape", "is there a red circle in the image"], ["yes", "no"], ["vqa"] * 2
    )
    q = p.questions(["is there a shape", "is there a red circle in the image"])
    width = q["input_ids"].shape[1]
    assert torch.equal(vqa["input_ids"][:, :width], q["input_ids"])
    answer = vqa["input_ids"][0, width:].tolist()
    assert p.tokenizer.convert_ids_to_tokens(answer[0]).startswith("ĠY") and answer[-1] == p.eos
    assert (vqa["labels"][:, :width] == -100).all()
    assert q["input_ids"][0, -1] == p.pad and q["attention_mask"][0, -1] == 0  # right-padded
