"""Prismer / PrismerZ: frozen vision and language backbones joined by small trainable parts."""

from __future__ import annotations

import math
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
    (the batch's label embeddings), tiled into ``(B, C, H, W)`` on the model's device. Instance
    experts also pass ``instances (B, H, W)`` int64: each pixel's instance id (0 = background),
    ids shared across the batch as Prismer's instance maps are."""

    index: Tensor
    table: Tensor
    instances: Tensor | None = None


ExpertInput = Tensor | SemanticInput


@dataclass(frozen=True)
class ExpertSlot:
    """What the core needs of an enabled expert: its contract, read from the expert class."""

    name: str
    kind: str
    channels: int
    # key of its conv stem in ``expert_stems`` (the expert's stem_group, else its name)
    stem: str = ""
    # instance expert: instance embeddings are added to its tokens
    instances: bool = False


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
    ``from_config`` (no I/O); weights arrive through ``load_pretrained``. The architecture
    ``prismer`` (``prismkit.core.architecture.Architecture``).

    Vision: the RGB patch tokens (no class token) and, with experts, the Experts Resampler's
    latents over every expert's tokens (its stem's grid + the shared positional embedding, + an
    instance embedding per instance for instance experts) -> ``ln_pre`` -> frozen CLIP blocks with
    adaptors -> ``ln_post``. Language: a RoBERTa/BERT decoder cross-attending to those tokens.
    """

    name = "prismer"

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
        self.instance_embedding = None
        if any(s.instances for s in experts):
            w = config.vision.width
            self.instance_embedding = nn.Parameter(
                torch.randn(config.instance_embeddings, w) * w**-0.5
            )
        self.objective = objective
        # parameter names whose values came from pretrained weights (load_pretrained, or a
        # checkpoint loaded with load_weights); the rest are newly initialised
        self.pretrained_names: set[str] = set()
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
        ac = config.adaptor
        adaptor_cls = host.adaptors.get(ac.name)

        def adaptor(width: int, post_norm: bool, eps: float):
            hidden = max(1, int(width * ac.ratio))
            return lambda: adaptor_cls(
                width=width,
                hidden=hidden,
                act=ac.act,
                post_norm=post_norm,
                zero_init=ac.zero_init,
                eps=eps,
            )

        stem = host.image_stems.get(vc.stem)(width=vc.width, patch_size=vc.patch_size)
        vision = host.vision_backbones.get(vc.backbone)(
            config=vc, stem=stem, adaptor=adaptor(vc.width, False, vc.eps)
        )
        language = host.language_backbones.get(lc.backbone)(
            config=lc, adaptor=adaptor(lc.width, True, lc.eps), vision_width=vc.width
        )
        slots = [_slot(host, name) for name in config.experts]
        stems: dict[str, nn.Module] = {}
        for s in slots:
            if s.stem in stems:
                first = next(o for o in slots if o.stem == s.stem)
                if (first.kind, first.channels) != (s.kind, s.channels):
                    raise PluginError(
                        f"experts {first.name!r} and {s.name!r} share stem group {s.stem!r} but differ: "
                        f"{first.kind}/{first.channels}ch vs {s.kind}/{s.channels}ch"
                    )
                continue
            stems[s.stem] = ExpertStem(
                in_channels=s.channels, width=vc.width, patch_size=vc.patch_size, kind=s.kind
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
            reduction=config.loss_reduction,
            width=lc.width,
            vision_width=vc.width,
            encoder_width=vc.width,
            **config.head_options,
        )
        model = cls(
            config=config,
            vision=vision,
            language=language,
            experts=slots,
            expert_stems=nn.ModuleDict(stems),
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

        def ids(*modules: nn.Module) -> set[int]:
            return {id(p) for m in modules for p in m.parameters()}

        stem = self.vision.stem
        loaded: set[int] = set()
        if vc.pretrained:
            self.vision.load_pretrained(vc.pretrained)
            adaptors = [layer.adaptor for layer in self.vision.layers if layer.adaptor is not None]
            loaded |= ids(self.vision) - ids(*adaptors)
            if not stem.weights_in_backbone:
                loaded -= ids(stem)
        if vc.stem_pretrained != NO_WEIGHTS:
            self.vision.stem.load_pretrained(vc.stem_pretrained)
            if not stem.weights_in_backbone and (vc.stem_pretrained or stem.default_pretrained):
                loaded |= ids(stem) - ids(*stem.always_trainable())
        if lc.pretrained:
            missing = set(self.language.load_pretrained(lc.pretrained))
            loaded |= {id(p) for n, p in self.language.named_parameters() if n not in missing}
        self.pretrained_names |= {n for n, p in self.named_parameters() if id(p) in loaded}

    def new_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that no pretrained weights initialised (``pretrained_names``):
        cross-attention, adaptors, output layer, resampler, expert stems, a stem's projection,
        a vision transformer without ``vision.pretrained``... (``train.new_lr``)."""
        return [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and n not in self.pretrained_names
        ]

    # -- freezing -----------------------------------------------------------------------------
    def trainable_parameters(self, stage: str = "pretrain") -> list[nn.Parameter]:
        """What trains in ``stage``, as Prismer's reference freezes it.

        "pretrain" (the reference's ``freeze_lang_vision``): the vision blocks' attention, MLP
        and their LayerNorms, and the language layers' self-attention and feed-forward blocks
        (with their LayerNorms) stay frozen; everything else trains: the RGB patch conv (unless
        ``vision.stem_frozen``: a pretrained CNN), positions, ``ln_pre``/``ln_post``, adaptors,
        expert stems, resampler, instance embeddings, decoder cross-attention, the output layer,
        embeddings and LM head. "finetune" (``freeze_vision``): the whole language model trains
        too. ``vision.frozen = false`` / ``language.frozen = false`` train those blocks in every
        stage."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        v, lang = self.vision, self.language
        # the objective's own parameters (BLIP's projections and ITM head) always train
        mods: list[nn.Module] = [
            self.expert_stems,
            self.objective,
            v.pre_layrnorm,
            v.post_layernorm,
        ]
        params: list[nn.Parameter] = [v.position_embedding]
        if self.instance_embedding is not None:
            params.append(self.instance_embedding)
        if self.resampler is not None:
            mods.append(self.resampler)
        if self.config.vision.frozen:
            mods += [layer.adaptor for layer in v.layers]
        else:
            mods.append(v.layers)
        stem_frozen = self.config.vision.stem_frozen
        if stem_frozen is None:
            stem_frozen = v.stem.frozen_by_default
        mods += v.stem.always_trainable() if stem_frozen else [v.stem]
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
            if lang.output_layer is not None:
                mods.append(lang.output_layer)
            for layer in lang.layers:
                mods += [m for m in (layer.cross_attn, layer.cross_norm, layer.adaptor) if m]
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

    # -- architecture contract ----------------------------------------------------------------
    def describe_title(self) -> str:
        title = "PrismerZ (RGB only)" if self.config.is_prismerz else "Prismer"
        # another objective on the same layout (SimVLM's prefix LM, mu-VLA, BLIP's frozen heads)
        return title if self.config.head == "lm" else f"{title} layout, head {self.config.head!r}"

    def describe_parts(self) -> list[tuple[str, nn.Module | nn.Parameter | None]]:
        return [
            ("vision backbone", self.vision),
            ("language backbone", self.language),
            ("expert stems", self.expert_stems),
            ("instance embeddings", self.instance_embedding),
            ("resampler", self.resampler),
            ("head", self.objective),
        ]

    def checkpoint_state(self) -> dict[str, Tensor]:
        """The trainable weights, frozen ones no pretrained source can restore (a backbone with
        ``pretrained = None``, a stem with ``stem_pretrained = "none"``), the statistics of
        BatchNorm layers that train (expert stems, a stem trained from scratch) and every expert
        stem buffer, and the objective's buffers (its training state: queues, momentum copies,
        counters)."""
        vc, lc = self.config.vision, self.config.language
        unsourced = []
        if not vc.pretrained:
            unsourced.append("vision.")
        if not lc.pretrained:
            unsourced.append("language.")
        stem_unsourced = vc.stem_pretrained == NO_WEIGHTS
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        buffers = {f"expert_stems.{n}" for n, _ in self.expert_stems.named_buffers()}
        buffers |= {f"objective.{n}" for n, _ in self.objective.named_buffers()}
        buffers |= {
            f"{name}.{b}" if name else b
            for name, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(p.requires_grad for p in m.parameters())
            for b, _ in m.named_buffers(recurse=False)
        }
        state = {}
        for name, t in self.state_dict(keep_vars=True).items():
            # a stem that loads its own pretrained trunk needs no copy in the checkpoint
            cnn_trunk = name.startswith("vision.stem.") and not self.vision.stem.weights_in_backbone
            if (
                id(t) in trainable
                or name in buffers
                or (name.startswith(tuple(unsourced)) and not cnn_trunk)
                or (cnn_trunk and stem_unsourced)
            ):
                state[name] = t.detach().contiguous().cpu()
        return state

    def begin_step(self, step: int) -> None:
        """Tell the objective which optimizer step the next forwards belong to."""
        hook = getattr(self.objective, "begin_step", None)
        if hook is not None:
            hook(step)

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

    @property
    def expert_size(self) -> int:
        return self.config.vision.expert_size or self.config.vision.image_size

    def expert_maps(
        self, experts: dict[str, ExpertInput] | None, batch: int
    ) -> list[tuple[Tensor, Tensor | None]]:
        """Each enabled expert's input ``(B, C, S, S)`` at ``expert_size`` (nearest resize, as PIL
        resizes label images) on the model's device, and its instance map ``(B, S, S)`` (instance
        experts) or None. Dense maps are rescaled per sample to [-1, 1) (``2 (x - min) / (max -
        min + 1e-6) - 1``, min/max over all channels); semantic indices are tiled from their
        table."""
        maps = []
        for value, instances in self.expert_inputs(experts, batch):
            if isinstance(value, tuple):
                idx, table = value
                value = F.embedding(idx, table).permute(0, 3, 1, 2)
            maps.append((value, instances))
        return maps

    def expert_inputs(
        self, experts: dict[str, ExpertInput] | None, batch: int
    ) -> list[tuple[Tensor | tuple[Tensor, Tensor], Tensor | None]]:
        """As :meth:`expert_maps`, but a semantic expert's map stays untiled: ``(index (B, S, S),
        table (K, C))`` (its stem resizes it on the label grid, :meth:`ExpertStem.forward_labels`)."""
        experts = experts or {}
        s = self.expert_size
        missing = [e.name for e in self.experts if e.name not in experts]
        extra = sorted(set(experts) - {e.name for e in self.experts})
        if missing or extra:
            raise ValueError(
                f"expert inputs: missing {missing}, not enabled {extra}; the model uses {[e.name for e in self.experts]}"
            )
        out: list[tuple[Tensor | tuple[Tensor, Tensor], Tensor | None]] = []
        for slot in self.experts:
            value = experts[slot.name]
            instances = None
            if slot.kind == "semantic":
                if not isinstance(value, SemanticInput):
                    raise TypeError(
                        f"expert {slot.name!r} is semantic: pass SemanticInput(index, table)"
                    )
                if value.table.shape[-1] != slot.channels:
                    raise ValueError(
                        f"expert {slot.name!r} table has {value.table.shape[-1]} dims; expected {slot.channels}"
                    )
                labels = (_resize_labels(value.index, s), value.table.to(self.pixel_mean.dtype))
                if slot.instances:
                    inst = value.instances if value.instances is not None else value.index
                    instances = _resize_labels(inst, s)
                out.append((labels, instances))
                continue
            x = value
            if x.dim() != 4 or x.shape[:2] != (batch, slot.channels):
                raise ValueError(
                    f"expert {slot.name!r} map is {tuple(x.shape)}; expected ({batch}, {slot.channels}, H, W)"
                )
            x = x.float()
            if x.shape[-2:] != (s, s):
                x = F.interpolate(x, size=(s, s), mode="nearest-exact")
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            out.append((2 * (x - lo) / (hi - lo + 1e-6) - 1, instances))
        return out

    def add_instances(self, feats: Tensor, instances: Tensor, rows: Tensor | None = None) -> Tensor:
        """``feats (B, D, g, g) + instance_embedding[row of each token's instance]``.

        The instance map ``(B, S, S)`` is sampled at the token grid (torch ``nearest``: token
        (i, j) takes pixel (i S/g, j S/g)). Every instance id present in the batch gets a row of
        the embedding table drawn uniformly at random, in the reference's order (instance ids
        ascending, background last), from torch's random generator, at every forward, evaluation
        included, as the reference does (it uses Python's ``random``; drawing from torch makes runs
        reproducible with ``torch.manual_seed`` and resumable). ``rows`` (one per id, in that
        order) replays a given draw."""
        assert self.instance_embedding is not None
        ids = torch.unique(instances)
        order = torch.cat([ids[ids != 0], ids[ids == 0]])
        if rows is None:
            rows = torch.randint(
                0, self.instance_embedding.shape[0], (len(order),), device=feats.device
            )
        elif rows.shape != order.shape:
            raise ValueError(
                f"instance rows: {len(order)} ids in the batch but {rows.numel()} rows"
            )
        lut = torch.zeros(int(ids.max()) + 1, dtype=torch.long, device=feats.device)
        lut[order.to(feats.device)] = rows.to(feats.device)
        grid = feats.shape[-2:]
        sampled = F.interpolate(instances[:, None].float(), size=grid, mode="nearest")[:, 0]
        emb = self.instance_embedding.to(feats.dtype)[lut[sampled.long().to(feats.device)]]
        return feats + emb.permute(0, 3, 1, 2)

    def stem_features(self, images: Tensor) -> Tensor | None:
        """The image stem's frozen part's output ``(B, C, g, g)`` for ``images (B, 3, S, S)`` in
        [0, 1] (None when nothing in the stem is frozen): a pure function of each image, which
        :meth:`encode_image` and :meth:`forward` take back as ``stem_features``."""
        return self.vision.stem.frozen_features(self.check_images(images))

    # -- model --------------------------------------------------------------------------------
    def encode_image(
        self,
        images: Tensor,
        experts: dict[str, ExpertInput] | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        instance_rows: Tensor | None = None,
        trace: dict[str, Tensor] | None = None,
        stem_features: Tensor | None = None,
    ) -> Tensor:
        """``(B, 3, S, S)`` RGB in [0, 1] (+ expert labels) -> vision tokens ``(B, N, D)``:
        ``S^2 / P^2`` RGB tokens, then the resampler's latents when experts are enabled.

        ``text (B, Tt, D)``: further tokens encoded with the image in one bidirectional pass
        (SimVLM's joint encoder), appended after the image tokens; ``text_mask (B, Tt)`` 1 =
        token, 0 = padding; the output is then ``(B, N + Tt, D)``. ``trace`` (a dict) receives
        the intermediate tensors ``resampler_in``, ``resampler_out`` and ``ln_pre_in``.
        ``stem_features``: :meth:`stem_features` of these images, computed earlier (a training
        loop's per-image cache), so the frozen trunk does not run again."""
        x = self.check_images(images)
        tokens = self.vision.embed(x, stem_features)
        if self.resampler is not None:
            expert_tokens = []
            for slot, (m, inst) in zip(
                self.experts, self.expert_inputs(experts, x.shape[0]), strict=True
            ):
                stem = self.expert_stems[slot.stem]
                if isinstance(m, tuple):
                    f = stem.forward_labels(m[0], m[1].to(tokens.dtype))
                else:
                    f = stem(m.to(tokens.dtype))
                if inst is not None:
                    f = self.add_instances(f, inst, instance_rows)
                f = f.flatten(2).transpose(1, 2)
                expert_tokens.append(f + self.vision.positions(math.isqrt(f.shape[1])).to(f.dtype))
            expert_tokens = torch.cat(expert_tokens, dim=1)
            latents = self.resampler(expert_tokens)
            if trace is not None:
                trace["resampler_in"], trace["resampler_out"] = expert_tokens, latents
            tokens = torch.cat([tokens, latents], dim=1)
        elif experts:
            raise ValueError(
                f"PrismerZ uses no experts, but expert inputs {sorted(experts)} were given"
            )
        mask = None
        if text is not None:
            real = tokens.new_ones(tokens.shape[:2], dtype=torch.long)
            text_mask = real[:, :1].expand(text.shape[:2]) if text_mask is None else text_mask
            tokens, mask = torch.cat([tokens, text], 1), torch.cat([real, text_mask.long()], 1)
        if trace is not None:
            trace["ln_pre_in"] = tokens
        return self.vision.encode(tokens, mask)

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        experts: dict[str, ExpertInput] | None = None,
        prefix_len: Tensor | None = None,
        stem_features: Tensor | None = None,
        **extra: object,
    ) -> PrismerOutput:
        """With ``labels``: the configured objective's loss (and its parts); without: logits.
        ``stem_features``: :meth:`stem_features` of ``images`` (cached); objectives that declare
        ``accepts_stem_features`` use them."""
        if stem_features is not None:
            if not getattr(self.objective, "accepts_stem_features", False):
                raise ValueError(
                    f"objective {type(self.objective).__name__} does not take stem_features: "
                    "turn train.cache_frozen_features off for this head"
                )
            extra["stem_features"] = stem_features
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
        vision = self.encode_image(images, experts, stem_features=stem_features)
        hidden, _ = self.language(input_ids, vision, attention_mask, prefix_len=prefix_len)
        return PrismerOutput(None, self.language.logits(hidden))


def _slot(host: PluginHost, name: str) -> ExpertSlot:
    expert = host.expert(name)
    for req in expert.requires:
        if req not in host.experts or (
            host.enabled_experts is not None and req not in host.enabled_experts
        ):
            raise PluginError(
                f"expert {name!r} (plugin {host.experts.owner(name)!r}) requires expert {req!r}, which is not "
                f"registered and enabled; enabled experts: {', '.join(host.enabled_experts or host.experts.names())}"
            )
    if expert.instances and expert.kind != "semantic":
        raise PluginError(f"expert {name!r}: only semantic experts can declare instances")
    return ExpertSlot(
        name,
        expert.kind,
        expert.channels,
        expert.stem_group or name,
        bool(expert.instances),
    )


def _resize_labels(index: Tensor, size: int) -> Tensor:
    """``(B, H, W)`` int64 labels -> ``(B, size, size)`` (nearest pixel centres, as PIL)."""
    if index.shape[-2:] == (size, size):
        return index
    out = F.interpolate(index[:, None].float(), size=(size, size), mode="nearest-exact")
    return out[:, 0].long()


def create_model(config: ModelConfig, host: PluginHost | None = None, pretrained: bool = True):
    """Build the model a config describes with the architecture it names
    (``config.architecture``, registered through ``register_architectures``); ``pretrained``
    loads the weights it names."""
    host = host or get_plugin_manager()
    model = host.architectures.get(config.architecture).from_config(config, host)
    if pretrained:
        model.load_pretrained()
    return model
