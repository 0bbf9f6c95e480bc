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
    with pytest.raises(
        ValueError, match="the model takes at most 24: shorten it or raise max_text_len"
    ):
        processor.encode(["what " * 30], ["red"])


def test_prompts_are_left_padded_and_decode_round_trips(processor):
    p = processor.prompts(["what color", "is there a red circle in the image"])
    assert p["attention_mask"][0, 0] == 0 and p["attention_mask"][0, -1] == 1
    ids = processor.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert processor.decode([*ids, processor.eos, 7, 8]) == "red circle"
