"""mu-VLA's pairs: noun-phrase spans, batch extras and the ``muvla_pairs`` reader."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from prismkit.core.data import DataError, Sample, VLDataset, _subset
from prismkit.core.heads import IGNORE
from prismkit.muvla.corpus import embeddings_path, read_embeddings, tags_text

# -- noun phrases and the batch extras ---------------------------------------------------------
STOP_WORDS = frozenset(
    """a an the this that these those there here it its they them their he she his her we our you
    your i my me of in on at to from by with without for into onto over under above below near
    behind beside between through and or but nor so as than then while is are was were be been
    being am has have had do does did can could will would should may might must not no yes very
    some any each every all both few many much more most other another such what which who whom
    whose where when why how one two three""".split()  # noqa: SIM905 - a word list
)
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_Row = tuple[list[int], list[bool], list[bool]]  # ids, maskable words, inside a noun phrase


def _norm(word: str) -> str:
    w = word.lower()
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def noun_phrase_spans(sentence: str, tags: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the noun-phrase chunks of ``sentence`` that match a tag.

    Offline heuristic (no tagger/parser): a chunk is a maximal run of consecutive non-stop-words
    separated only by spaces or hyphens (``"the big red circle on a mat"`` -> ``big red circle``,
    ``mat``); a chunk matches when one of its words equals a word of a tag, case-insensitive,
    with a plural ``-s`` ignored (tag ``"circle"`` matches ``"circles"``).
    """
    tag_words = {_norm(w) for t in tags for w in _WORD.findall(t)} - {_norm(s) for s in STOP_WORDS}
    words = [m for m in _WORD.finditer(sentence) if m.group().lower() not in STOP_WORDS]
    spans: list[tuple[int, int]] = []
    chunk: list[re.Match[str]] = []

    def flush() -> None:
        if chunk and any(_norm(m.group()) in tag_words for m in chunk):
            spans.append((chunk[0].start(), chunk[-1].end()))
        chunk.clear()

    for m in words:
        if chunk and sentence[chunk[-1].end() : m.start()].strip(" -"):
            flush()
        chunk.append(m)
    flush()
    return spans


def maskable(tokenizer: Any, ids: Sequence[int]) -> list[bool]:
    """Which token ids are (part of) a word and may be masked: not special tokens, and their
    decoded text holds a letter or digit. Decoding matters: a byte-level BPE piece carries its
    leading space as a marker (RoBERTa's ``"Ġ,"``) and ``"Ġ".isalnum()`` is True, so reading the
    raw piece would make punctuation an MLM target."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [
        i not in special and any(c.isalnum() for c in t) for i, t in zip(ids, texts, strict=True)
    ]


def _encode_span(processor: Any, text: str, spans: Sequence[tuple[int, int]] = ()) -> _Row:
    """``[BOS] text [EOS]`` ids (cut to the model's max_text_len), which tokens are maskable
    (words, not specials or punctuation) and which lie in ``spans``."""
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    limit = processor.config.max_text_len - 2
    ids = enc["input_ids"][:limit]
    offs = enc["offset_mapping"][:limit]
    word = maskable(processor.tokenizer, ids)
    inside = [
        any(s < b and e > a for a, b in spans) and w for (s, e), w in zip(offs, word, strict=True)
    ]
    return (
        [processor.bos, *ids, processor.eos],
        [False, *word, False],
        [False, *inside, False],
    )


def _to_tensors(processor: Any, t: list[_Row], s: list[_Row]) -> dict[str, Tensor]:
    def pad(rows: list[list[Any]], value: Any, dtype: torch.dtype) -> Tensor:
        n = max(map(len, rows))
        return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=dtype)

    return {
        "tag_ids": pad([r[0] for r in t], processor.pad, torch.long),
        "tag_mask": pad([[1] * len(r[0]) for r in t], 0, torch.long),
        "tag_words": pad([r[1] for r in t], False, torch.bool),
        "sent_ids": pad([r[0] for r in s], processor.pad, torch.long),
        "sent_mask": pad([[1] * len(r[0]) for r in s], 0, torch.long),
        "sent_words": pad([r[1] for r in s], False, torch.bool),
        "np_mask": pad([r[2] for r in s], False, torch.bool),
    }


def muvla_extras(
    processor: Any, tags: Sequence[Sequence[str]], sentences: Sequence[str]
) -> dict[str, Tensor]:
    """The objective's batch extras from each sample's tags and retrieved sentence.

    Returns (right-padded with the tokenizer's pad id):
        ``tag_ids, tag_mask, tag_words (B, Tt)``: ``[BOS] tag1, tag2 [EOS]``, its attention mask,
        and which tokens may be masked (tag words, not commas or specials);
        ``sent_ids, sent_mask, sent_words (B, Ts)``: the same for the retrieved sentence;
        ``np_mask (B, Ts)`` bool: sentence tokens inside a tag-matching noun phrase
        (:func:`noun_phrase_spans`).
    """
    if len(tags) != len(sentences):
        raise ValueError(f"{len(tags)} tag lists but {len(sentences)} sentences")
    t = [_encode_span(processor, tags_text(ts)) for ts in tags]
    s = [
        _encode_span(processor, sent, noun_phrase_spans(sent, ts))
        for ts, sent in zip(tags, sentences, strict=True)
    ]

    return _to_tensors(processor, t, s)


def collate_pairs(processor: Any, samples: Sequence[Sample]) -> dict[str, Any]:
    """A training batch of :class:`MuVLAPairs` samples for a custom loop: ``images``, the standard
    ``encode(prompt=tags, target=sentence)`` tensors and :func:`muvla_extras`, so
    ``model(**batch, experts=...)`` runs the objective with its extras."""
    tags = [split_tags(s.prompt) for s in samples]
    return {
        "images": processor.images([s.image for s in samples]),
        **processor.encode([s.prompt for s in samples], [s.target for s in samples]),
        **muvla_extras(processor, tags, [s.target for s in samples]),
    }


def split_tags(text: str) -> list[str]:
    """``"tag1, tag2"`` -> ``["tag1", "tag2"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def extras_from_encoded(
    processor: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """:func:`muvla_extras` recovered from a plain ``encode(prompt=tags, target=sentence)`` batch
    (what ``prismkit.engine.train`` passes): tags = the tokens before the first label, as they
    are; the sentence (the labelled tokens without EOS) is decoded and re-encoded alone, as
    :func:`muvla_extras` encodes it (in the plain batch it follows the tags in one string, so
    with byte-level BPE its first word carries a space marker it does not have alone), with its
    noun phrases chunked from the decoded text."""
    tok = processor.tokenizer

    def words(ids: list[int]) -> list[bool]:
        return maskable(tok, ids)

    t_rows: list[_Row] = []
    s_rows: list[_Row] = []
    for ids, mask, lab in zip(
        input_ids.tolist(), attention_mask.tolist(), labels.tolist(), strict=True
    ):
        real = [i for i, m in zip(ids, mask, strict=True) if m]
        first = next((j for j, v in enumerate(lab) if v != IGNORE), None)
        if first is None:
            raise ValueError("a muvla sample has no sentence tokens (every label is -100)")
        prompt = real[1:first]
        sent = [v for v in lab[first:] if v not in (IGNORE, processor.eos)]
        t_ids = [processor.bos, *prompt, processor.eos]
        t_rows.append((t_ids, [False, *words(prompt), False], [False] * len(t_ids)))
        text = tok.decode(sent, skip_special_tokens=True).strip()
        tags = split_tags(tok.decode(prompt, skip_special_tokens=True))
        s_rows.append(_encode_span(processor, text, noun_phrase_spans(text, tags)))
    out = _to_tensors(processor, t_rows, s_rows)
    return {k: v.to(input_ids.device) for k, v in out.items()}


# -- the dataset reader ------------------------------------------------------------------------
class MuVLAPairs(VLDataset):
    """The weakly aligned pairs JSONL of ``prismkit muvla build``: one sample per row with
    ``rank <= max_rank`` and ``score >= min_score``; ``prompt`` = the tag sentence
    (``"tag1, tag2"``), ``target`` = the retrieved sentence, so the plain training loop's
    ``encode(prompt, target)`` carries everything :class:`MuVLAObjective` needs. Relative image
    paths are relative to the JSONL's folder.

    When the build's retrieval embeddings lie beside the JSONL (:func:`embeddings_path`), each
    sample carries them as ``extras`` ``tag_emb (D,)`` and ``sent_emb (D,)``: the training loop
    hands them to the objective, whose ITM hard negatives are drawn by retrieval similarity."""

    name: ClassVar[str] = "muvla_pairs"
    task: ClassVar[str] = "caption"

    def __init__(
        self,
        *,
        pairs: str,
        split: str = "train",
        max_rank: int = 5,
        min_score: float = -1.0,
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        path = Path(pairs)
        if not path.is_file():
            raise DataError(
                f"pairs file {path} does not exist: build it with `prismkit muvla build`"
            )
        samples: list[Sample] = []
        emb = read_embeddings(path)
        index = -1  # row of the JSONL (non-empty lines), as in the embeddings file
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            index += 1
            try:
                row = json.loads(line)
                image, sentence, rank = str(row["image"]), str(row["sentence"]), int(row["rank"])
                tags, score = [str(t) for t in row["tags"]], float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"{path} line {n}: expected {{'image', 'sentence', 'score', 'rank', 'tags'}} ({e})"
                ) from None
            if rank > max_rank or score < min_score:
                continue
            if not tags or not sentence.strip():
                raise DataError(f"{path} line {n}: empty tags or sentence")
            img = Path(image) if Path(image).is_absolute() else path.parent / image
            if not img.is_file():
                raise DataError(f"{path} line {n}: image {img} does not exist")
            extras = {}
            if emb is not None:
                if index >= emb[0].shape[0]:
                    raise DataError(
                        f"{path} line {n}: no retrieval embedding for row {index} in "
                        f"{embeddings_path(path)}: rebuild with `prismkit muvla build`"
                    )
                extras = {"tag_emb": emb[0][index], "sent_emb": emb[1][index]}
            samples.append(
                Sample(
                    str(img), image, tags_text(tags), sentence.strip(), [sentence], extras=extras
                )
            )
        super().__init__(_subset(samples, fraction, seed))
