"""BLIP's text conventions: caption cleaning, the first-token swaps and the caption decode."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

# BLIP's init_tokenizer(): bert-base-uncased + bos_token [DEC] + additional special token [ENC]
SPECIAL_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's ``data/utils.pre_caption``: lower-case, each of ``. ! " ( ) * # : ; ~`` -> a
    space, runs of whitespace -> one space, strip, keep the first ``max_words`` words (commas
    stay). The COCO/Flickr readers apply it with ``max_words=30``."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def with_first_token(ids: Tensor, token: int) -> Tensor:
    """``ids (B, T)`` with column 0 replaced by ``token`` ([ENC] for ITM, [DEC] for the decoder);
    the rest of every row (its [SEP], its pads) unchanged."""
    out = ids.clone()
    out[:, 0] = token
    return out


def decode_caption(tokenizer, ids: Sequence[int], prompt: str) -> str:
    """BLIP_Decoder.generate's decode: the whole row (prompt included) with special tokens
    skipped, then the prompt cut off by CHARACTER count (``caption[len(prompt):]``)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)[len(prompt) :]
