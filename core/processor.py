"""Images and text in, model tensors out (and token ids back to text)."""

from __future__ import annotations

import re
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

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """The reference's caption clean-up: capitalise (first letter upper, rest lower), the
    characters ``.!"()*#:;~`` to spaces, repeated spaces collapsed, stripped, ``max_words`` kept."""
    caption = _PUNCTUATION.sub(" ", caption.capitalize())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_words: int = 50) -> str:
    """The reference's question clean-up: as :func:`pre_caption` (without collapsing spaces), and
    a question mark appended when missing."""
    question = _PUNCTUATION.sub(" ", question.capitalize()).strip()
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question if question.endswith("?") else question + "?"


def load_image(source: ImageLike) -> Tensor:
    """One image -> ``(3, H, W)`` float32 RGB in [0, 1]. Files honour EXIF rotation; grayscale,
    RGBA, palette, CMYK and 16-bit images are converted to RGB."""
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                im.load()
                source = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as e:
            raise ValueError(
                f"image {source}: too large to decode safely ({e}): downscale it, or raise "
                f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
            ) from None
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
        if len(tokenizer) > config.language.vocab_size:
            raise ValueError(
                f"config {config.name!r}: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) "
                f"has {len(tokenizer)} tokens but language.vocab_size is "
                f"{config.language.vocab_size}: use the language model's own tokenizer "
                f"(language.tokenizer) or a vocab_size of at least {len(tokenizer)}"
            )

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

    # -- Prismer's text formats ---------------------------------------------------------------
    def caption_text(self, prompt: str, caption: str) -> str:
        """The one string a caption is tokenised as: ``prompt + " " + caption`` through the
        reference's ``pre_caption`` when ``text.normalize`` (first letter upper-cased and the rest
        lower-cased, ``.!"()*#:;~`` replaced by spaces, spaces collapsed, ``max_words`` kept)."""
        text = f"{prompt} {caption}" if prompt else caption
        return (
            pre_caption(text, self.config.text.max_words)
            if self.config.text.normalize
            else text.strip()
        )

    def question_text(self, question: str) -> str:
        """A question as the reference feeds it (``pre_question``, then capitalised)."""
        if not self.config.text.normalize:
            return question.strip()
        return pre_question(question, self.config.text.max_words).capitalize()

    def answer_text(self, answer: str) -> str:
        """An answer as the reference appends it: ``" " + answer.capitalize()`` (the leading space
        gives the first word its byte-level BPE space marker)."""
        return " " + (answer.strip().capitalize() if self.config.text.normalize else answer.strip())

    def _caption_row(
        self, prompt: str, caption: str, limit: int | None = None
    ) -> tuple[list[int], list[int]]:
        """``[BOS] prompt caption [EOS]`` tokenised as one string and its labels (-100 on BOS
        and the prompt); cut to ``limit`` tokens when given (captions that are data)."""
        text = self.caption_text(prompt, caption)
        ids = self._ids(text)
        if limit is not None:
            ids = ids[: limit - 2]
        seq = [self.bos, *ids, self.eos]
        if prompt and self.config.text.normalize:
            prompt = pre_caption(prompt, self.config.text.max_words)
        n_prompt = 1 + (len(self._ids(prompt)) if prompt else 0)
        labels = [IGNORE] * n_prompt + seq[n_prompt:]
        if len(labels) > len(seq) or n_prompt >= len(seq) - 1:
            raise ValueError(f"caption {caption[:60]!r} leaves no target tokens after the prompt")
        return seq, labels[: len(seq)]

    def encode(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        tasks: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        truncate: bool = False,
        max_len: int | None = None,
    ) -> dict[str, Tensor]:
        """A training batch, in the reference's formats; right-padded.

        ``"caption"`` rows: ``[BOS] prompt target [EOS]`` tokenised as ONE string (so the first
        target word carries its leading space with byte-level BPE, as the reference's
        ``tokenizer("A picture of " + caption)``), cut to ``text.caption_tokens`` as the
        reference's tokenizer call cuts captions; labels -100 on BOS, the prompt and padding.
        ``"vqa"`` rows (``prompts`` are questions): the question block ``[BOS] question`` (cut to
        ``text.question_tokens``, right-padded to the batch's longest question, as the reference
        pads it) followed by the answer block ``" Answer" [EOS]``; labels on the answer only.

        ``max_len`` (default ``config.max_text_len``) bounds each row, BOS and EOS included: a
        longer row is refused (text a user typed), unless ``truncate`` (captions that are data:
        web captions, corpus sentences; BLIP cuts them to 30 or 35 tokens), which cuts the tail
        and keeps EOS. Empty targets are refused either way: drop them first (:func:`drop_empty`).
        Returns ``input_ids``, ``attention_mask``, ``labels`` and, when given, ``weights``.
        """
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        limit = self.config.max_text_len if max_len is None else max_len
        if limit < 3:
            raise ValueError(f"max_len must leave room for BOS, one token and EOS; got {limit}")
        tasks = list(tasks) if tasks is not None else ["caption"] * len(prompts)
        for i, t in enumerate(targets):
            if not t.strip():
                raise ValueError(
                    f"empty target text (sample {i}, prompt {prompts[i]!r}): drop empty captions "
                    "first (prismkit.core.processor.drop_empty)"
                )
        # data captions: cut as the reference's tokenizer call (``text.caption_tokens``) unless
        # the caller names its own bound
        cut = None
        if truncate:
            cut = min(self.config.text.caption_tokens, limit) if max_len is None else limit
        qlen = self.config.text.question_tokens
        questions = {
            i: [self.bos, *self._ids(self.question_text(prompts[i]))][:qlen]
            for i, task in enumerate(tasks)
            if task == "vqa"
        }
        qwidth = max((len(q) for q in questions.values()), default=0)
        rows: list[tuple[list[int], list[int], list[int]]] = []
        for i, (prompt, target, task) in enumerate(zip(prompts, targets, tasks, strict=True)):
            if task == "vqa":
                q = questions[i]
                a = [*self._ids(self.answer_text(target)), self.eos]
                if truncate and len(q) + len(a) > limit:
                    a = [*a[: max(1, limit - len(q) - 1)], self.eos]
                pad = [self.pad] * (qwidth - len(q))
                seq = q + pad + a
                mask = [1] * len(q) + [0] * len(pad) + [1] * len(a)
                labels = [IGNORE] * qwidth + a
            elif task == "caption":
                seq, labels = self._caption_row(prompt, target, cut)
                mask = [1] * len(seq)
            else:
                raise ValueError(f"sample {i}: unknown task {task!r}; expected 'caption' or 'vqa'")
            self._check_len(sum(mask), prompt + " " + target, limit)
            rows.append((seq, mask, labels))
        n = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (s_, m_, l_) in enumerate(rows):
            ids[i, : len(s_)] = torch.tensor(s_)
            mask[i, : len(m_)] = torch.tensor(m_)
            labels[i, : len(l_)] = torch.tensor(l_)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if weights is not None:
            out["weights"] = torch.tensor(list(weights), dtype=torch.float32)
        return out

    def batch(self, samples, truncate: bool = False) -> dict[str, Tensor]:
        """:meth:`encode` of dataset samples (``prompt``, ``target``, ``task``, ``weight``)."""
        weights = [s.weight for s in samples]
        return self.encode(
            [s.prompt for s in samples],
            [s.target for s in samples],
            [s.task for s in samples],
            weights if any(w != 1.0 for w in weights) else None,
            truncate=truncate,
        )

    def _pad(self, seqs: list[list[int]], left: bool = False) -> dict[str, Tensor]:
        """Token rows -> ``input_ids`` / ``attention_mask`` padded to the longest row."""
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(n - len(s), n) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Caption generation prompts ``[BOS] prompt`` (the reference tokenises the prompt and
        drops its EOS), left-padded when they differ in length."""
        seqs = [[self.bos, *(self._ids(p.strip()) if p.strip() else [])] for p in prompts]
        for s, p in zip(seqs, prompts, strict=True):
            self._check_len(len(s), p)
        return self._pad(seqs, left=True)

    def questions(self, questions: Sequence[str]) -> dict[str, Tensor]:
        """VQA prompts as the reference builds them: ``[BOS] question`` (no EOS), right-padded."""
        seqs = [
            [self.bos, *self._ids(self.question_text(q))][: self.config.text.question_tokens]
            for q in questions
        ]
        return self._pad(seqs)

    def answers(self, answers: Sequence[str]) -> dict[str, Tensor]:
        """Candidate answers ``" Answer" [EOS]``, right-padded ``(C, A)`` ids and mask."""
        return self._pad(self.candidates(answers))

    def candidates(self, candidates: Sequence[str]) -> list[list[int]]:
        """Answer candidates as token ids ending in EOS (with the leading space)."""
        return [[*self._ids(self.answer_text(c)), self.eos] for c in candidates]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tokenizer.decode(
            [i for i in ids if i not in (self.pad, self.bos)], skip_special_tokens=True
        ).strip()
