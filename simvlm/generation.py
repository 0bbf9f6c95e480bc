"""Zero-shot generation with the prompt as a bidirectional prefix (captioning, open-ended VQA)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from prismkit.core.generation import BeamConfig, beam_search
from prismkit.core.model import ExpertInput, PrismerModel
from prismkit.core.processor import ImageLike, Processor
from prismkit.engine.evaluate import Predictor
from prismkit.simvlm.decoders import PrefixDecoder


def _pixels(
    source: Predictor | PrismerModel, processor: Processor, images: Sequence[ImageLike] | Tensor
) -> tuple[PrismerModel, Tensor, dict[str, ExpertInput] | None]:
    """Images -> (model, pixels ``(B, 3, S, S)``, expert inputs); a Predictor's feeder runs the
    experts."""
    model = source.model if isinstance(source, Predictor) else source
    model.eval()
    device = next(model.parameters()).device
    if isinstance(images, Tensor):
        pixels, ids = images, [f"image-{n}" for n in range(images.shape[0])]
    else:
        pixels = processor.images(images)
        ids = [
            str(im) if isinstance(im, (str, Path)) else f"image-{n}" for n, im in enumerate(images)
        ]
    pixels = pixels.to(device)
    if isinstance(source, Predictor):
        experts = source.feeder(pixels, ids)
    elif model.experts:
        raise TypeError(
            f"the model uses experts {[e.name for e in model.experts]}: pass a Predictor "
            "(its feeder runs them)"
        )
    else:
        experts = None
    return model, pixels, experts


@torch.no_grad()
def prefix_generate(
    source: Predictor | PrismerModel,
    processor: Processor,
    images: Sequence[ImageLike] | Tensor,
    prompts: Sequence[str],
    cfg: BeamConfig | None = None,
) -> list[str]:
    """Beam-search a continuation of each prompt (one per image), the prompt read as a
    bidirectional prefix. ``images``: paths, PIL images, arrays or ``(B, 3, S, S)`` in [0, 1].
    ``cfg`` lengths count new tokens unless ``cfg.new_tokens`` is False (default: 20 new tokens,
    at least 1). A ``prefix_lm`` model generates as it was trained (decoder-only or joint
    encoder-decoder, the head's ``generation_inputs``); any other model reads the prompt
    bidirectionally in its language model."""
    model, pixels, experts = _pixels(source, processor, images)
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
    p = {k: v.to(pixels.device) for k, v in processor.prompts(list(prompts)).items()}
    hook = getattr(model.objective, "generation_inputs", None)
    if hook is not None:
        decoder, vision, ids, mask = hook(
            model, pixels, experts, p["input_ids"], p["attention_mask"]
        )
    else:
        decoder = PrefixDecoder(model.language)
        vision, ids, mask = model.encode_image(pixels, experts), p["input_ids"], p["attention_mask"]
    out = beam_search(
        decoder,  # type: ignore[arg-type]  # duck-typed TextDecoder
        vision,
        ids,
        mask,
        processor.eos,
        processor.pad,
        cfg or BeamConfig(max_length=20, min_length=1, new_tokens=True),
    )
    return [processor.decode(o) for o in out.new_tokens(processor.eos, processor.pad)]


def prefix_caption(
    source: Predictor | PrismerModel,
    processor: Processor,
    images: Sequence[ImageLike] | Tensor,
    prefix: str = "a picture of",
    cfg: BeamConfig | None = None,
) -> list[str]:
    """Zero-shot captioning (SimVLM): continue ``prefix`` for each image."""
    n = images.shape[0] if isinstance(images, Tensor) else len(images)
    return prefix_generate(source, processor, images, [prefix] * n, cfg)


def prefix_vqa(
    source: Predictor | PrismerModel,
    processor: Processor,
    images: Sequence[ImageLike] | Tensor,
    questions: Sequence[str],
    prompt: str = "question: {} answer:",
    cfg: BeamConfig | None = None,
) -> list[str]:
    """Open-ended VQA: generate after ``prompt.format(question)`` read as the prefix."""
    cfg = cfg or BeamConfig(beams=3, max_length=8, min_length=1, new_tokens=True)
    return prefix_generate(source, processor, images, [prompt.format(q) for q in questions], cfg)
