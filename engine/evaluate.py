"""Evaluation (captioning, VQA, classification) and inference on images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prismkit.core.data import VLDataset, label_key
from prismkit.core.generation import BeamConfig, beam_search, score_candidates
from prismkit.core.model import PrismerModel
from prismkit.core.processor import ImageLike, Processor


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
        prompts: Sequence[str] | str,
        ids: list[str] | None = None,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixels, expert labels and prompts -> :func:`generation_inputs`. One ``prompts``
        string is used for every image."""
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
        prompts = [prompts] * b if isinstance(prompts, str) else list(prompts)
        if len(prompts) != b:
            raise ValueError(f"{b} images but {len(prompts)} questions")
        p = {k: v.to(device) for k, v in self.processor.prompts(prompts).items()}
        with torch.no_grad():
            experts = self.feeder(pixels, ids)
            return generation_inputs(
                self.model, pixels, experts, p["input_ids"], p["attention_mask"]
            )

    @torch.no_grad()
    def caption(
        self, images, prompt: str = "", cfg: BeamConfig | None = None, ids: list[str] | None = None
    ) -> list[str]:
        self.model.eval()
        decoder, vision, input_ids, mask = self._inputs(images, prompt, ids)
        out = beam_search(
            decoder,
            vision,
            input_ids,
            mask,
            self.processor.eos,
            self.processor.pad,
            cfg or BeamConfig(),
        )
        return [self.processor.decode(o) for o in out]

    @torch.no_grad()
    def answer(
        self,
        images,
        questions: Sequence[str],
        candidates: Sequence[str] | None = None,
        prompt: str = "question: {} answer:",
        top_k: int | None = None,
        ids: list[str] | None = None,
    ) -> list[str]:
        """Closed-ended (rank ``candidates`` by mean log-likelihood) or open-ended (beam search)."""
        self.model.eval()
        decoder, vision, input_ids, mask = self._inputs(
            images, [prompt.format(q) for q in questions], ids
        )
        if candidates:
            scores = score_candidates(
                decoder,
                vision,
                input_ids,
                mask,
                self.processor.candidates(candidates),
                self.processor.pad,
                top_k,
            )
            return [candidates[j] for j in scores.argmax(-1).tolist()]
        out = beam_search(
            decoder,
            vision,
            input_ids,
            mask,
            self.processor.eos,
            self.processor.pad,
            BeamConfig(beams=3, max_length=8, min_length=1),
        )
        return [self.processor.decode(o) for o in out]

    @torch.no_grad()
    def classify(
        self, images, classes: Sequence[str], template: str = "a photo of a {}"
    ) -> torch.Tensor:
        """``(B, C)`` mean log-likelihood of "a photo of a [CLASS]" for each class."""
        self.model.eval()
        decoder, vision, input_ids, mask = self._inputs(images, "")
        return score_candidates(
            decoder,
            vision,
            input_ids,
            mask,
            self.processor.candidates([template.format(c) for c in classes]),
            self.processor.pad,
        )


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
    list, and open-ended generation) or caption BLEU-4 / CIDEr-D (beam search)."""
    from prismkit.engine import metrics
    from prismkit.engine.batching import ImageCache, iter_batches

    pred = Predictor(model, processor, feeder)
    images = ImageCache(data, model.config.vision.image_size)
    n = 0
    if data.task == "vqa":
        closed, opened, refs = [], [], []
        for idx in iter_batches(data, batch_size, limit):
            samples = [data[i] for i in idx]
            pixels = torch.stack([images(i) for i in idx])
            ids = [label_key(s) for s in samples]
            questions = [s.prompt for s in samples]
            closed += pred.answer(
                pixels, questions, data.answer_list, prompt="{}", top_k=cfg.top_k, ids=ids
            )
            opened += pred.answer(pixels, questions, None, prompt="{}", ids=ids)
            refs += [s.references or [s.target] for s in samples]
            n += len(idx)
        return {
            "vqa_accuracy": metrics.vqa_accuracy(closed, refs),
            "vqa_accuracy_open": metrics.vqa_accuracy(opened, refs),
            "samples": float(n),
        }
    if data.task == "caption":
        preds, refs = {}, {}
        beam = BeamConfig(beams=cfg.beams, max_length=cfg.max_length, min_length=cfg.min_length)
        seen: set[str] = set()
        for idx in iter_batches(data, batch_size, limit):
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
        scores = metrics.caption_scores(preds, refs)
        return {"bleu4": scores["Bleu_4"], "cider": scores["CIDEr"], "samples": float(n)}
    raise ValueError(
        f"dataset {data.name!r} has task {data.task!r}; evaluate supports 'vqa' and 'caption'"
    )


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
