"""Zero-shot generation with the prompt as a bidirectional prefix (captioning, open-ended VQA)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from prismkit.core.generation import BeamConfig, beam_search
from prismkit.core.language.decoder import DecoderCache, TextDecoder
from prismkit.core.model import PrismerModel
from prismkit.core.processor import ImageLike, Processor
from prismkit.engine.evaluate import Predictor

# timm ResNet modules up to the end of stage 3 (stride 16); same names as in timm's checkpoints


# -- zero-shot generation with the prompt as prefix ---------------------------------------------
class PrefixDecoder:
    """A :class:`TextDecoder` as ``beam_search``/``score_candidates`` call it, with the prompt as
    a bidirectional prefix: the first call (no cache) runs the prompt with ``prefix_len`` = its
    real tokens; cached steps add causal tokens; uncached re-runs (``use_cache=False``) keep the
    prompt's ``prefix_len`` (beams are reordered only among the rows of one prompt)."""

    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder
        self.prefix_len: Tensor | None = None

    def __call__(
        self,
        input_ids: Tensor,
        vision: Tensor | None,
        attention_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, DecoderCache]:
        if cache is not None:
            return self.decoder(input_ids, vision, attention_mask, cache=cache)
        if self.prefix_len is None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            self.prefix_len = mask.sum(1)
        elif input_ids.shape[0] != self.prefix_len.shape[0]:
            # the first call ran each prompt once (``decoder_step``: the same prompt for every
            # beam); uncached re-runs hold ``beams`` rows per prompt, in prompt order
            beams, rest = divmod(input_ids.shape[0], self.prefix_len.shape[0])
            if beams > 1 and not rest:
                self.prefix_len = self.prefix_len.repeat_interleave(beams)
        if input_ids.shape[0] != self.prefix_len.shape[0]:
            raise ValueError(
                f"prompt batch had {self.prefix_len.shape[0]} rows, this call {input_ids.shape[0]}"
            )
        return self.decoder(input_ids, vision, attention_mask, prefix_len=self.prefix_len)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.logits(hidden)

    @property
    def pad_token_id(self) -> int:
        return self.decoder.pad_token_id


def _encode(
    source: Predictor | PrismerModel, processor: Processor, images: Sequence[ImageLike] | Tensor
) -> tuple[PrismerModel, Tensor]:
    """Images -> (model, vision tokens ``(B, Nv, D)``); a Predictor's feeder runs the experts."""
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
    return model, model.encode_image(pixels, experts)


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
    at least 1)."""
    model, vision = _encode(source, processor, images)
    if len(prompts) != vision.shape[0]:
        raise ValueError(f"{vision.shape[0]} images but {len(prompts)} prompts")
    p = {k: v.to(vision.device) for k, v in processor.prompts(list(prompts)).items()}
    out = beam_search(
        PrefixDecoder(model.language),  # type: ignore[arg-type]  # duck-typed TextDecoder
        vision,
        p["input_ids"],
        p["attention_mask"],
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
