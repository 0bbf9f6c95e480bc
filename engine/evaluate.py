"""Evaluation (captioning, VQA, classification) and inference on images."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from prismkit.core.data import VLDataset, label_key
from prismkit.core.generation import BeamConfig, beam_search, rank_answers
from prismkit.core.model import PrismerModel
from prismkit.core.processor import ImageLike, Processor
from prismkit.core.progress import Progress


def generation_inputs(
    model: PrismerModel,
    images: torch.Tensor,
    experts: dict | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What generation runs for prompts ``input_ids (B, P)`` (left-padded) on ``images``:
    ``(decoder, vision, input_ids, attention_mask)`` for ``beam_search``/``score_candidates``.
    The head's own ``generation_inputs`` when it defines one (SimVLM reads the prompt as a
    bidirectional prefix, or encodes it with the image); else the language model with the image
    tokens, the prompt read causally."""
    hook = getattr(model.objective, "generation_inputs", None)
    if hook is not None:
        return hook(model, images, experts, input_ids, attention_mask)
    return model.language, model.encode_image(images, experts), input_ids, attention_mask


class Predictor:
    """A model with its processor and expert feeder: images and text in, text out.

    ``caption(images)``, ``answer(images, questions, candidates=None)``, ``classify(images,
    classes)``. Images are paths, PIL images, arrays or ``(B, 3, H, W)`` tensors in [0, 1].
    """

    def __init__(self, model: PrismerModel, processor: Processor, feeder) -> None:
        self.model, self.processor, self.feeder = model, processor, feeder

    def _inputs(
        self,
        images: Sequence[ImageLike] | torch.Tensor,
        text: dict[str, torch.Tensor],
        ids: list[str] | None = None,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixels (+ the feeder's expert labels) and encoded prompts ``text`` (``input_ids``,
        ``attention_mask``, one row per image) -> :func:`generation_inputs`."""
        device = next(self.model.parameters()).device
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            pixels = self.processor.images(images)
            ids = ids or [
                str(i) if isinstance(i, str) else f"image-{n}" for n, i in enumerate(images)
            ]
        pixels = pixels.to(device)
        b = pixels.shape[0]
        ids = ids or [f"image-{n}" for n in range(b)]
        if text["input_ids"].shape[0] != b:
            raise ValueError(f"{b} images but {text['input_ids'].shape[0]} prompts or questions")
        input_ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
        with torch.no_grad():
            if getattr(self.model.objective, "generation_inputs", None) is not None:
                experts = self.feeder(pixels, ids)
                return generation_inputs(self.model, pixels, experts, input_ids, mask)
            # images with one id (the questions about one image) are encoded once
            first = {i: n for n, i in reversed(list(enumerate(ids)))}
            unique = sorted(first.values())
            where = torch.tensor([unique.index(first[i]) for i in ids], device=device)
            pixels = pixels[unique]
            vision = self.model.encode_image(pixels, self.feeder(pixels, [ids[n] for n in unique]))
            return self.model.language, vision[where], input_ids, mask

    @staticmethod
    def _count(images: Sequence[ImageLike] | torch.Tensor) -> int:
        return images.shape[0] if isinstance(images, torch.Tensor) else len(images)

    @torch.no_grad()
    def caption(
        self,
        images,
        prompt: str | None = None,
        cfg: BeamConfig | None = None,
        ids: list[str] | None = None,
    ) -> list[str]:
        """Beam-search captions after ``prompt`` (default: the config's ``text.caption_prompt``;
        "" for zero-shot models), transformers' semantics (``max_length`` counts the prompt)."""
        self.model.eval()
        own = getattr(self.model, "caption", None)
        if own is not None:  # an architecture with its own generation (BLIP): its prompt, lengths
            pixels = images if isinstance(images, torch.Tensor) else self.processor.images(images)
            return own(pixels, self.processor, None, num_beams=(cfg or BeamConfig()).beams)
        prompt = self.processor.config.text.caption_prompt if prompt is None else prompt
        text = self.processor.prompts([prompt] * self._count(images))
        decoder, vision, input_ids, mask = self._inputs(images, text, ids)
        out = beam_search(
            decoder,
            vision,
            input_ids,
            mask,
            self.processor.eos,
            self.processor.pad,
            cfg or BeamConfig(),
        )
        return [
            self.processor.decode(o) for o in out.new_tokens(self.processor.eos, self.processor.pad)
        ]

    @torch.no_grad()
    def answer(
        self,
        images,
        questions: Sequence[str],
        candidates: Sequence[str] | None = None,
        top_k: int | None = None,
        ids: list[str] | None = None,
        cfg: BeamConfig | None = None,
    ) -> list[str]:
        """Closed-ended: Prismer's ranking of ``candidates`` (the ``top_k`` likeliest by first
        token, default all, re-scored by label-smoothed mean log-likelihood); open-ended: beam
        search after the question, as ``PrismerVQA(inference="generate")``: ``max_length`` =
        question + 10, ``min_length`` = question + 2, ``length_penalty`` -1 unless ``cfg``."""
        self.model.eval()
        if len(questions) != self._count(images):
            raise ValueError(f"{self._count(images)} images but {len(questions)} questions")
        decoder, vision, input_ids, mask = self._inputs(
            images, self.processor.questions(questions), ids
        )
        if candidates:
            a = {k: v.to(vision.device) for k, v in self.processor.answers(candidates).items()}
            ranked = rank_answers(
                decoder,
                vision,
                input_ids,
                mask,
                a["input_ids"],
                a["attention_mask"],
                top_k or len(candidates),
                self.model.config.label_smoothing,
            )
            return [candidates[j] for j in ranked.answer_index.tolist()]
        width = input_ids.shape[1]
        cfg = cfg or BeamConfig(
            beams=3, max_length=width + 10, min_length=width + 2, length_penalty=-1.0
        )
        out = beam_search(
            decoder,
            vision,
            input_ids,
            mask,
            self.processor.eos,
            self.processor.pad,
            cfg,
        )
        return [
            self.processor.decode(o).lower().strip()
            for o in out.new_tokens(self.processor.eos, self.processor.pad)
        ]

    @torch.no_grad()
    def classify(
        self, images, classes: Sequence[str], prompt: str = "A photo of a"
    ) -> torch.Tensor:
        """``(B, C)`` label-smoothed mean log-likelihood of ``" " + class`` after ``prompt``
        (Prismer's zero-shot classification ranks "A photo of a [CLASS]")."""
        self.model.eval()
        text = self.processor.prompts([prompt] * self._count(images))
        decoder, vision, input_ids, mask = self._inputs(images, text)
        a = {
            k: v.to(vision.device)
            for k, v in self.processor.answers([c.lower() for c in classes]).items()
        }
        ranked = rank_answers(
            decoder,
            vision,
            input_ids,
            mask,
            a["input_ids"],
            a["attention_mask"],
            len(classes),
            self.model.config.label_smoothing,
        )
        scores = torch.full((vision.shape[0], len(classes)), float("-inf"), device=vision.device)
        return scores.scatter(1, ranked.topk_ids, ranked.scores)


def evaluate(
    model: PrismerModel,
    processor: Processor,
    data: VLDataset,
    feeder,
    cfg,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Metrics of ``model`` on ``data``: VQA accuracy (closed-set ranking over the dataset's answer
    list, and open-ended generation) or caption BLEU-4 / ROUGE-L / CIDEr-D, plus METEOR and SPICE
    when ``cfg.java_metrics`` allows and Java is here (beam search). A progress bar shows on a
    terminal."""
    from prismkit.engine import metrics
    from prismkit.engine.batching import ImageCache, iter_batches

    pred = Predictor(model, processor, feeder)
    images = ImageCache(data, model.config.vision.image_size)
    n = 0
    total = len(data) if limit is None else min(limit, len(data))
    bar = Progress(total, f"eval {data.name}", unit="sample")
    if data.task == "vqa":
        closed, opened, refs, types = [], [], [], []
        for idx in iter_batches(data, batch_size, limit):
            bar.update(len(idx))
            samples = [data[i] for i in idx]
            pixels = torch.stack([images(i) for i in idx])
            ids = [label_key(s) for s in samples]
            questions = [s.prompt for s in samples]
            closed += pred.answer(pixels, questions, data.answer_list, top_k=cfg.top_k, ids=ids)
            if cfg.vqa_open:
                opened += pred.answer(pixels, questions, None, ids=ids)
            refs += [s.references or [s.target] for s in samples]
            types += [s.question_type for s in samples]
            n += len(idx)
        bar.close()
        out = {"vqa_accuracy": metrics.vqa_accuracy(closed, refs)}
        if opened:
            out["vqa_accuracy_open"] = metrics.vqa_accuracy(opened, refs)
        out["samples"] = float(n)
        # per question type (closed-set ranking): "vqa_accuracy/yes_no_color", "samples/..."
        for t, (acc, count) in metrics.vqa_accuracy_by_type(closed, refs, types).items():
            key = re.sub(r"\W+", "_", t)
            out[f"vqa_accuracy/{key}"], out[f"samples/{key}"] = acc, float(count)
        return out
    if data.task == "caption":
        preds, refs = {}, {}
        beam = BeamConfig(beams=cfg.beams, max_length=cfg.max_length, min_length=cfg.min_length)
        seen: set[str] = set()
        for idx in iter_batches(data, batch_size, limit):
            bar.update(len(idx))
            idx = [i for i in idx if data[i].image_id not in seen]  # one caption per image
            if not idx:
                continue
            samples = [data[i] for i in idx]
            seen |= {s.image_id for s in samples}
            pixels = torch.stack([images(i) for i in idx])
            caps = pred.caption(
                pixels, samples[0].prompt, beam, ids=[label_key(s) for s in samples]
            )
            for s, c in zip(samples, caps, strict=True):
                preds[s.image_id] = c or "(empty)"
                refs[s.image_id] = s.references or [s.target]
            n += len(idx)
        bar.close()
        java = _java_metrics(getattr(cfg, "java_metrics", "off"))
        scores = metrics.caption_scores(preds, refs, java=java)
        out = {"bleu4": scores["Bleu_4"], "rouge_l": scores["ROUGE_L"], "cider": scores["CIDEr"]}
        out.update({k.lower(): scores[k] for k in java})
        return {**out, "samples": float(n)}
    raise ValueError(
        f"dataset {data.name!r} has task {data.task!r}; evaluate supports 'vqa' and 'caption'"
    )


def _java_metrics(mode: str) -> tuple[str, ...]:
    """The Java caption metrics to compute for ``eval.java_metrics`` (auto / on / off); "auto"
    prints one line naming what is missing and how to get it."""
    from prismkit.engine.metrics import JAVA_METRICS, java_metrics_missing

    if mode == "off":
        return ()
    missing = java_metrics_missing()
    if missing and mode == "on":
        raise ValueError("eval.java_metrics = 'on': " + "; ".join(missing.values()))
    for why in missing.values():
        print(f'note: {why} (eval.java_metrics="off" silences this)', file=sys.stderr)
    return tuple(m for m in JAVA_METRICS if m not in missing)


def evaluate_datasets(
    model: PrismerModel,
    processor: Processor,
    host,
    spec: str,
    split: str,
    options: dict,
    feeder,
    cfg,
    limit: int | None = None,
) -> dict[str, float]:
    """:func:`evaluate` on each reader of ``spec`` (``"easyvqa+easyvqa_captions"``); with several,
    metric names are prefixed by the reader's name."""
    from prismkit.core.data import build_dataset

    names = spec.split("+")
    metrics: dict[str, float] = {}
    for name in names:
        data = build_dataset(host.datasets, name, split, **options)
        for k, v in evaluate(model, processor, data, feeder, cfg, limit=limit).items():
            metrics[k if len(names) == 1 else f"{name}/{k}"] = v
    return metrics
