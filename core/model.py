"""Prismer / PrismerZ: frozen vision and language backbones joined by small trainable parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.config import NO_WEIGHTS, ModelConfig
from prismkit.core.host import PluginError, PluginHost, get_plugin_manager
from prismkit.core.language.decoder import TextDecoder
from prismkit.core.vision.expert_stem import ExpertStem
from prismkit.core.vision.vit import ClipViT


class SemanticInput(NamedTuple):
    """A semantic expert's labels for a batch: ``index (B, H, W)`` int64 rows of ``table (K, C)``
    (the batch's label embeddings). Tiled into ``(B, C, H, W)`` on the model's device."""

    index: Tensor
    table: Tensor


ExpertInput = Tensor | SemanticInput


@dataclass(frozen=True)
class ExpertSlot:
    """What the core needs of an enabled expert: its contract, read from the expert class."""

    name: str
    kind: str
    channels: int


@dataclass
class PrismerOutput:
    # training loss when labels were given
    loss: Tensor | None
    # (B, T, V) next-token logits; only computed when no labels were given
    logits: Tensor | None
    # the objective's loss parts, for logging
    parts: dict[str, Tensor] = field(default_factory=dict)


class PrismerModel(nn.Module):
    """``forward(images (B, 3, S, S) in [0, 1], input_ids (B, T), ...)``; built by
    ``from_config`` (no I/O); weights arrive through ``load_pretrained``."""

    def __init__(
        self,
        *,
        config: ModelConfig,
        vision: ClipViT,
        language: TextDecoder,
        experts: list[ExpertSlot],
        expert_stems: nn.ModuleDict,
        resampler: nn.Module | None,
        objective: nn.Module,
    ) -> None:
        super().__init__()
        if bool(experts) != (resampler is not None):
            raise ValueError("a resampler is needed exactly when experts are enabled")
        self.config = config
        self.vision = vision
        self.language = language
        self.experts = experts
        self.expert_stems = expert_stems
        self.resampler = resampler
        vw, lw = config.vision.width, config.language.width
        self.vision_proj = nn.Linear(vw, lw) if vw != lw else nn.Identity()
        self.objective = objective
        self.register_buffer(
            "pixel_mean", torch.tensor(config.vision.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(config.vision.std).view(1, 3, 1, 1), persistent=False
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, host: PluginHost | None = None) -> PrismerModel:
        host = host or get_plugin_manager()
        vc, lc = config.vision, config.language
        adaptor_cls = host.adaptors.get(config.adaptor.name)

        def adaptor(width: int):
            return lambda: adaptor_cls(
                width=width, hidden=max(1, int(width * config.adaptor.ratio))
            )

        stem = host.image_stems.get(vc.stem)(width=vc.width, patch_size=vc.patch_size)
        vision = host.vision_backbones.get(vc.backbone)(
            config=vc, stem=stem, adaptor=adaptor(vc.width)
        )
        language = host.language_backbones.get(lc.backbone)(config=lc, adaptor=adaptor(lc.width))
        slots = []
        for name in config.experts:
            expert = host.expert(name)
            for req in expert.requires:
                if req not in host.experts or (
                    host.enabled_experts is not None and req not in host.enabled_experts
                ):
                    raise PluginError(
                        f"expert {name!r} (plugin {host.experts.owner(name)!r}) requires expert {req!r}, which is not "
                        f"registered and enabled; enabled experts: {', '.join(host.enabled_experts or host.experts.names())}"
                    )
            slots.append(ExpertSlot(name, expert.kind, expert.channels))
        stems = nn.ModuleDict(
            {
                s.name: ExpertStem(
                    in_channels=s.channels,
                    width=vc.width,
                    patch_size=vc.patch_size,
                    hidden=config.stem_channels,
                )
                for s in slots
            }
        )
        resampler = None
        if slots:
            rc = config.resampler
            resampler = host.resamplers.get(rc.name)(
                width=vc.width, latents=rc.latents, layers=rc.layers, heads=rc.heads
            )
        # heads with parameters (BLIP's projections, ITM head) are sized from the widths
        objective = host.heads.get(config.head)(
            label_smoothing=config.label_smoothing,
            width=config.language.width,
            vision_width=config.language.width,
            encoder_width=config.vision.width,
            **config.head_options,
        )
        model = cls(
            config=config,
            vision=vision,
            language=language,
            experts=slots,
            expert_stems=stems,
            resampler=resampler,
            objective=objective,
        )
        model.freeze()
        return model

    def load_pretrained(self) -> None:
        """Read the pretrained weights the config names (hub id, local folder or package)."""
        vc, lc = self.config.vision, self.config.language
        for name, source in (
            ("vision.pretrained", vc.pretrained),
            ("language.pretrained", lc.pretrained),
            ("vision.stem_pretrained", vc.stem_pretrained),
        ):
            if (
                source
                and source.startswith(("/", ".", "~"))
                and not weights.status(source).available
            ):
                raise FileNotFoundError(
                    f"{name} = {source!r}: {weights.status(source).where}; fix the path or use a hub id"
                )
        if vc.pretrained:
            self.vision.load_pretrained(vc.pretrained)
        if vc.stem_pretrained != NO_WEIGHTS:
            self.vision.stem.load_pretrained(vc.stem_pretrained)
        if lc.pretrained:
            self.language.load_pretrained(lc.pretrained)

    # -- freezing -----------------------------------------------------------------------------
    def trainable_parameters(self, stage: str = "pretrain") -> list[nn.Parameter]:
        """What trains in ``stage``. "pretrain": both backbones frozen except adaptors,
        LayerNorms, positional embeddings, decoder cross-attention and embeddings/LM head, plus
        the expert stems, resampler and projections. "finetune": the language model unfrozen too."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        v, lang = self.vision, self.language
        # the objective's own parameters (BLIP's projections and ITM head) always train
        mods: list[nn.Module] = [
            self.vision_proj,
            self.expert_stems,
            self.objective,
            v.pre_layrnorm,
            v.post_layernorm,
        ]
        params: list[nn.Parameter] = [v.position_embedding]
        if self.resampler is not None:
            mods.append(self.resampler)
        if self.config.vision.frozen:
            for layer in v.layers:
                mods += [layer.adaptor, layer.layer_norm1, layer.layer_norm2]
        else:
            mods.append(v.layers)
            params.append(v.class_embedding)
        mods += [v.stem] if not self.config.vision.stem_frozen else v.stem.always_trainable()
        if stage == "finetune" or not self.config.language.frozen:
            mods.append(lang)
        else:
            mods += [
                lang.word_embeddings,
                lang.position_embeddings,
                lang.token_type_embeddings,
                lang.embed_norm,
                lang.head,
            ]
            for layer in lang.layers:
                mods += [
                    layer.cross_attn,
                    layer.cross_norm,
                    layer.adaptor,
                    layer.attn_norm,
                    layer.ffn_norm,
                ]
        for m in mods:
            params += list(m.parameters())
        return list({id(p): p for p in params}.values())

    def freeze(self, stage: str = "pretrain") -> None:
        """Freeze everything, then unfreeze ``trainable_parameters(stage)``."""
        self.requires_grad_(False)
        for p in self.trainable_parameters(stage):
            p.requires_grad_(True)
        self.train(self.training)  # frozen BatchNorm stays in eval mode

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision.gradient_checkpointing = enabled
        self.language.gradient_checkpointing = enabled

    # -- inputs -------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> Tensor:
        s = self.config.vision.image_size
        if not isinstance(images, Tensor):
            raise TypeError(
                f"images must be a torch.Tensor (B, 3, {s}, {s}); got {type(images).__name__}: use prismkit.core.processor.Processor.images()"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be float in [0, 1], got dtype {images.dtype}: divide uint8 images by 255"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be (B, 3, {s}, {s}); got {tuple(images.shape)}: convert grayscale/RGBA to RGB, batch-first"
            )
        if images.shape[-2:] != (s, s):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the model takes {s}x{s}: resize them (Processor.images() does)"
            )
        return (images - self.pixel_mean) / self.pixel_std

    def expert_maps(self, experts: dict[str, ExpertInput] | None, batch: int) -> list[Tensor]:
        """Each enabled expert's input as ``(B, C, S, S)`` float on the model's device: dense maps
        rescaled per sample to [-1, 1], semantic indices tiled from their embedding table."""
        experts = experts or {}
        s = self.config.vision.image_size
        missing = [e.name for e in self.experts if e.name not in experts]
        extra = sorted(set(experts) - {e.name for e in self.experts})
        if missing or extra:
            raise ValueError(
                f"expert inputs: missing {missing}, not enabled {extra}; the model uses {[e.name for e in self.experts]}"
            )
        maps = []
        for slot in self.experts:
            value = experts[slot.name]
            if slot.kind == "semantic":
                if not isinstance(value, SemanticInput):
                    raise TypeError(
                        f"expert {slot.name!r} is semantic: pass SemanticInput(index, table)"
                    )
                if value.table.shape[-1] != slot.channels:
                    raise ValueError(
                        f"expert {slot.name!r} table has {value.table.shape[-1]} dims; expected {slot.channels}"
                    )
                idx = value.index
                if idx.shape[-2:] != (s, s):
                    idx = F.interpolate(idx[:, None].float(), size=(s, s), mode="nearest")[
                        :, 0
                    ].long()
                x = F.embedding(idx, value.table.to(self.pixel_mean.dtype)).permute(0, 3, 1, 2)
            else:
                x = value
                if x.dim() != 4 or x.shape[:2] != (batch, slot.channels):
                    raise ValueError(
                        f"expert {slot.name!r} map is {tuple(x.shape)}; expected ({batch}, {slot.channels}, H, W)"
                    )
                if x.shape[-2:] != (s, s):
                    x = F.interpolate(x.float(), size=(s, s), mode="nearest")
                lo = x.amin(dim=(1, 2, 3), keepdim=True)
                hi = x.amax(dim=(1, 2, 3), keepdim=True)
                x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
            maps.append(x)
        return maps

    # -- model --------------------------------------------------------------------------------
    def encode_image(
        self,
        images: Tensor,
        experts: dict[str, ExpertInput] | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, 3, S, S)`` RGB in [0, 1] (+ expert labels) -> vision tokens ``(B, Nv, D_lang)``.

        ``text (B, Tt, D_vision)``: further tokens encoded with the image in one bidirectional
        pass (SimVLM's joint encoder), appended after the image tokens; ``text_mask (B, Tt)``
        1 = token, 0 = padding. Output ``(B, Nv + Tt, D_lang)``."""
        x = self.check_images(images)
        tokens = self.vision.embed(x)
        if self.resampler is not None:
            pos = self.vision.patch_pos
            expert_tokens = [
                self.expert_stems[slot.name](m) + pos
                for slot, m in zip(self.experts, self.expert_maps(experts, x.shape[0]), strict=True)
            ]
            tokens = torch.cat([tokens, self.resampler(torch.cat(expert_tokens, dim=1))], dim=1)
        elif experts:
            raise ValueError(
                f"PrismerZ uses no experts, but expert inputs {sorted(experts)} were given"
            )
        mask = None
        if text is not None:
            real = tokens.new_ones(tokens.shape[:2], dtype=torch.long)
            text_mask = real[:, :1].expand(text.shape[:2]) if text_mask is None else text_mask
            tokens, mask = torch.cat([tokens, text], 1), torch.cat([real, text_mask.long()], 1)
        return self.vision_proj(self.vision.encode(tokens, mask))

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        experts: dict[str, ExpertInput] | None = None,
        prefix_len: Tensor | None = None,
        **extra: object,
    ) -> PrismerOutput:
        """With ``labels``: the configured objective's loss (and its parts); without: logits."""
        if labels is not None:
            loss, parts = self.objective(
                self,
                images=images,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                experts=experts,
                prefix_len=prefix_len,
                **extra,
            )
            return PrismerOutput(loss, None, parts)
        vision = self.encode_image(images, experts)
        hidden, _ = self.language(input_ids, vision, attention_mask, prefix_len=prefix_len)
        return PrismerOutput(None, self.language.logits(hidden))


def create_model(
    config: ModelConfig, host: PluginHost | None = None, pretrained: bool = True
) -> PrismerModel:
    """Build the model a config describes; ``pretrained`` loads the weights it names."""
    model = PrismerModel.from_config(config, host)
    if pretrained:
        model.load_pretrained()
    return model
