"""Images and text in, model tensors out (and token ids back to text)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from prismkit.core import weights
from prismkit.core.config import ModelConfig
from prismkit.core.heads import IGNORE

ImageLike = str | Path | Image.Image | np.ndarray | Tensor


def load_image(source: ImageLike) -> Tensor:
    """One image -> ``(3, H, W)`` float32 RGB in [0, 1]. Files honour EXIF rotation; grayscale,
    RGBA, palette, CMYK and 16-bit images are converted to RGB."""
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                im.load()
                source = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"image {source}: cannot be read ({e})") from None
    if isinstance(source, Image.Image):
        if source.mode in ("I;16", "I;16B", "I", "F"):
            arr = np.asarray(source, dtype=np.float32)
            arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
            return torch.from_numpy(np.repeat(arr[None], 3, axis=0))
        source = np.asarray(source.convert("RGB"))
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}")
        t = torch.from_numpy(np.array(arr[..., :3], copy=True)).permute(2, 0, 1)
        return t.float() / 255 if t.dtype == torch.uint8 else t.float()
    if isinstance(source, Tensor):
        if source.dim() != 3 or source.shape[0] not in (1, 3):
            raise ValueError(
                f"image tensor must be (3, H, W) or (1, H, W); got {tuple(source.shape)}"
            )
        t = source.float() / 255 if source.dtype == torch.uint8 else source.float()
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    raise TypeError(f"cannot read an image from {type(source).__name__}")


def drop_empty(texts: Sequence[str]) -> tuple[list[int], int]:
    """Indices of the texts that hold more than whitespace, and how many were dropped: data
    captions that are empty are skipped (and counted in a run's report), never fatal."""
    kept = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    return kept, len(texts) - len(kept)


class Processor:
    """Tokenizer + image resizing for one model config."""

    def __init__(self, tokenizer, config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.bos = (
            tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        )
        self.eos = (
            tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        )
        self.pad = tokenizer.pad_token_id
        if None in (self.bos, self.eos, self.pad):
            raise ValueError("tokenizer needs BOS/CLS, EOS/SEP and PAD tokens")

    @classmethod
    def from_config(cls, config: ModelConfig) -> Processor:
        from transformers import AutoTokenizer

        source = config.language.tokenizer or config.language.pretrained
        if source is None:
            raise ValueError(
                "language.tokenizer (or language.pretrained) must name a tokenizer folder or hub id"
            )
        tokenizer = AutoTokenizer.from_pretrained(weights.resolve(source))
        if config.language.special_tokens:
            tokenizer.add_special_tokens(dict(config.language.special_tokens))
        if len(tokenizer) > config.language.vocab_size:
            raise ValueError(
                f"tokenizer {source} has {len(tokenizer)} tokens but language.vocab_size is "
                f"{config.language.vocab_size}: raise vocab_size or fix language.special_tokens"
            )
        return cls(tokenizer, config)

    def images(self, images: Sequence[ImageLike]) -> Tensor:
        """``(B, 3, S, S)`` float32 in [0, 1], resized (bicubic, antialiased) to the model's size."""
        s = self.config.vision.image_size
        out = []
        for i, im in enumerate(images):
            t = load_image(im)
            if min(t.shape[-2:]) < 1:
                raise ValueError(f"image {i} is empty: {tuple(t.shape)}")
            t = F.interpolate(
                t[None], size=(s, s), mode="bicubic", antialias=True, align_corners=False
            )[0]
            out.append(t.clamp(0, 1))
        return torch.stack(out)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_len(self, n: int, text: str, limit: int | None = None) -> None:
        limit = self.config.max_text_len if limit is None else limit
        if n > limit:
            raise ValueError(
                f"text {text[:60]!r} is {n} tokens with BOS/EOS; the model takes at most {limit}: shorten it or raise max_text_len"
            )

    def encode(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        truncate: bool = False,
        max_len: int | None = None,
    ) -> dict[str, Tensor]:
        """Training batch: ``[BOS] prompt target [EOS]`` right-padded; labels -100 on BOS,
        prompt and padding so only the target is learned.

        ``max_len`` (default ``config.max_text_len``) bounds each sequence, BOS and EOS
        included. Text a user typed is refused when longer (``truncate=False``, the default);
        captions that are data (web captions, corpus sentences, dataset targets) pass
        ``truncate=True`` and are cut as a BERT tokenizer's ``truncation=True`` cuts them (BLIP:
        30 tokens in pre-training, 35 in retrieval): the tail of ``prompt target`` goes, EOS stays.
        Empty targets are refused either way: drop them first (:func:`drop_empty`).
        """
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        limit = self.config.max_text_len if max_len is None else max_len
        if limit < 3:
            raise ValueError(f"max_len must leave room for BOS, one token and EOS; got {limit}")
        seqs, labs = [], []
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            if not t.strip():
                raise ValueError(
                    f"empty target text (sample {i}, prompt {p!r}): drop empty captions first (prismkit.core.processor.drop_empty)"
                )
            pi, ti = self._ids(p) if p else [], self._ids(t)
            if truncate and len(pi) + len(ti) + 2 > limit:
                kept = (pi + ti)[: limit - 2]
                pi, ti = kept[: len(pi)], kept[len(pi) :]
            seq = [self.bos, *pi, *ti, self.eos]
            if len(seq) > limit:
                self._check_len(len(seq), p + " " + t, limit)
            seqs.append(seq)
            labs.append([IGNORE] * (1 + len(pi)) + [*ti, self.eos])
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Generation prompts ``[BOS] prompt``, left-padded."""
        seqs = [[self.bos, *(self._ids(p) if p else [])] for p in prompts]
        for s, p in zip(seqs, prompts, strict=True):
            self._check_len(len(s), p)
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def candidates(self, candidates: Sequence[str]) -> list[list[int]]:
        """Answer candidates as token ids ending in EOS."""
        return [[*self._ids(c), self.eos] for c in candidates]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tokenizer.decode(
            [i for i in ids if i not in (self.pad, self.bos)], skip_special_tokens=True
        ).strip()
