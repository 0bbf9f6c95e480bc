"""BLIP's model as a prismkit architecture (``architecture = "blip"``).

One class holds the parts of BLIP's released models; the config's ``head`` picks the task and
with it the parts (the reference's class):

| head | reference | parts |
|---|---|---|
| ``blip_pretrain`` | BLIP_Pretrain | ViT, text encoder, decoder tied to it but for self-attention, ITC projections, ITM head, LM head, momentum copies of ViT + encoder + projections, feature queues |
| ``blip_retrieval`` | BLIP_Retrieval | ViT, text encoder, ITC projections, ITM head, momentum copies, feature + image-id queues |
| ``blip_caption`` | BLIP_Decoder | ViT, decoder, LM head |

``forward`` is the training step the engine calls; ``pretrain_step``, ``retrieval_step`` and
``caption_step`` are the reference's forwards with every intermediate returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.blip import generation as gen
from prismkit.blip import losses
from prismkit.blip.generation import GenerationConfig
from prismkit.blip.med import MedConfig, MedLMHead, MedText, tie_encoder_decoder
from prismkit.blip.options import CAPTION, PRETRAIN, RETRIEVAL, TASKS, BlipOptions
from prismkit.blip.text import decode_caption, with_first_token
from prismkit.core.architecture import unique_state
from prismkit.core.config import ModelConfig
from prismkit.core.distributed import gather_all, gather_padded, gather_with_grad
from prismkit.core.host import PluginError, PluginHost, get_plugin_manager

LANGUAGE_BACKBONE = "med"


@dataclass
class BlipOutput:
    # training loss (sum of the task's parts)
    loss: Tensor | None
    # (B, T, V) decoder logits when no labels were given
    logits: Tensor | None = None
    # the loss parts, detached, for logging
    parts: dict[str, Tensor] = field(default_factory=dict)


def caption_tokens(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """The caption of a prismkit training batch as BLIP tokenizes it: the first token ([CLS])
    and the target tokens (``labels != -100``: the caption and [SEP]) packed to the left; the
    prompt is dropped. ``(B, T)`` each -> ``(B, T')`` ids and mask, right-padded with 0."""
    real = attention_mask.bool()
    first = (attention_mask.cumsum(1) == 1) & real
    keep = first | ((labels != losses.IGNORE) & real)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    lengths = keep.sum(1)
    width = int(lengths.max())
    mask = (torch.arange(width, device=input_ids.device)[None] < lengths[:, None]).long()
    ids = input_ids.gather(1, order[:, :width]) * mask
    return ids, mask


class BlipModel(nn.Module):
    """BLIP (Li et al., ICML 2022). ``forward(images (B, 3, S, S) in [0, 1], input_ids (B, T),
    attention_mask (B, T), labels (B, T), image_idx (B,))`` -> :class:`BlipOutput`; the batch is
    the engine's ``[CLS] prompt caption [SEP]`` with labels on the caption."""

    name = "blip"

    def __init__(
        self,
        *,
        config: ModelConfig,
        options: BlipOptions,
        vision: nn.Module,
        text_encoder: MedText | None,
        text_decoder: MedText | None,
    ) -> None:
        super().__init__()
        task = config.head
        self.config, self.options, self.task = config, options, task
        o = options
        self.vision = vision
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        if task == PRETRAIN:
            tie_encoder_decoder(text_encoder, text_decoder)
        h, w = config.language.width, config.vision.width
        self.lm_head = None
        if text_decoder is not None:
            self.lm_head = MedLMHead(h, config.language.vocab_size, config.language.eps)
        self.vision_proj = self.text_proj = self.itm_head = self.temp = None
        self.vision_m = self.vision_proj_m = self.text_encoder_m = self.text_proj_m = None
        if text_encoder is not None:
            self.vision_proj = nn.Linear(w, o.embed_dim)
            self.text_proj = nn.Linear(h, o.embed_dim)
            self.itm_head = nn.Linear(h, 2)  # plain nn.Linear init, as BLIP's
            self.temp = nn.Parameter(torch.tensor(o.temp))
            # momentum encoders: copies, never trained, EMA of the online weights
            self.vision_m = copy.deepcopy(vision)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_encoder_m = copy.deepcopy(text_encoder)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            queues = torch.randn(2, o.embed_dim, o.queue_size)
            self.register_buffer("image_queue", F.normalize(queues[0], dim=0))
            self.register_buffer("text_queue", F.normalize(queues[1], dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            if task == RETRIEVAL:  # -100: an empty slot, never equal to an image id
                self.register_buffer("idx_queue", torch.full((1, o.queue_size), -100))
        # schedules count optimizer steps (the engine's ``begin_step``); saved in checkpoints
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("momentum_step", torch.full((), -1, dtype=torch.long))
        self._engine_steps = False
        self.register_buffer(
            "pixel_mean", torch.tensor(config.vision.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(config.vision.std).view(1, 3, 1, 1), persistent=False
        )
        self.freeze()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, host: PluginHost | None = None) -> BlipModel:
        host = host or get_plugin_manager()
        if config.head not in TASKS:
            raise PluginError(
                f"architecture 'blip' has heads {', '.join(TASKS)}; config {config.name!r} names {config.head!r}"
            )
        if config.experts:
            raise PluginError(
                f"architecture 'blip' takes no experts; config names {config.experts}"
            )
        if config.language.backbone != LANGUAGE_BACKBONE:
            raise PluginError(
                f"architecture 'blip' runs its own BERT (MED): set language.backbone = '{LANGUAGE_BACKBONE}', got {config.language.backbone!r}"
            )
        o = BlipOptions.from_dict(config.head_options, f"config {config.name!r}")
        vision = host.vision_backbones.get(config.vision.backbone)(
            config=config.vision, drop_path=o.drop_path, checkpoint_layers=o.vit_checkpoint_layers
        )
        lc = config.language
        med = MedConfig(
            vocab_size=lc.vocab_size,
            width=lc.width,
            layers=lc.layers,
            heads=lc.heads,
            intermediate=lc.intermediate,
            max_positions=lc.max_positions,
            eps=lc.eps,
            encoder_width=config.vision.width,
            dropout=o.text_dropout,
            pad_token_id=o.pad_token_id,
        )
        encoder = MedText(med) if config.head in (PRETRAIN, RETRIEVAL) else None
        decoder = MedText(med) if config.head in (PRETRAIN, CAPTION) else None
        return cls(
            config=config, options=o, vision=vision, text_encoder=encoder, text_decoder=decoder
        )

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs (BLIP's ``model_pairs``)."""
        if self.text_encoder is None:
            return []
        return [
            (self.vision, self.vision_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def copy_momentum(self) -> None:
        """Momentum weights := online weights (BLIP's ``copy_params``, after loading)."""
        for online, mom in self.momentum_pairs():
            for p, p_m in zip(online.parameters(), mom.parameters(), strict=True):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m = p_m * m + p * (1 - m)`` for every (online, momentum) parameter pair."""
        m = self.options.momentum
        for online, mom in self.momentum_pairs():
            for p, p_m in zip(online.parameters(), mom.parameters(), strict=True):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    def load_pretrained(self) -> None:
        """Initialise from the sources the config names, as BLIP pre-training does: the ViT from
        ``vision.pretrained`` (a timm/DeiT-style state dict), the text model from
        ``language.pretrained`` (a BERT checkpoint folder or ``package:``); then the momentum
        copies start equal to the loaded weights."""
        from prismkit.blip import weights

        vc, lc = self.config.vision, self.config.language
        if vc.pretrained:
            weights.load_vit(self.vision, vc.pretrained)
        if lc.pretrained:
            state = weights.read_bert(lc.pretrained)
            for text in (self.text_encoder, self.text_decoder):
                if text is not None:
                    weights.load_bert(text, state)
            if self.lm_head is not None:
                weights.load_bert_lm_head(self.lm_head, state)
        self.copy_momentum()

    # -- architecture contract ----------------------------------------------------------------
    def freeze(self, stage: str = "pretrain") -> None:
        """Everything trains (BLIP fine-tunes every weight in every stage) except the momentum
        copies; ``vision.frozen`` / ``language.frozen`` freeze a tower."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        self.requires_grad_(True)
        if self.config.vision.frozen:
            self.vision.requires_grad_(False)
        if self.config.language.frozen:
            for text in (self.text_encoder, self.text_decoder):
                if text is not None:
                    text.requires_grad_(False)
        for _, mom in self.momentum_pairs():
            mom.requires_grad_(False)

    def parameter_counts(self) -> dict[str, int]:
        params = list(self.parameters())  # tied weights once
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        return {"trainable": trainable, "frozen": total - trainable, "total": total}

    def describe_title(self) -> str:
        return f"BLIP ({self.task})"

    def describe_parts(self) -> list[tuple[str, nn.Module | None]]:
        dec = None
        if self.text_decoder is not None:  # the decoder's own weights (all but tied ones)
            dec = nn.ModuleList([layer.self_attn for layer in self.text_decoder.layers])
            if self.text_encoder is None:
                dec = self.text_decoder
        heads = [m for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head) if m]
        momentum = [m for _, m in self.momentum_pairs()]
        return [
            ("vision (ViT)", self.vision),
            ("text encoder", self.text_encoder),
            ("text decoder (own)", dec),
            ("heads", nn.ModuleList(heads)),
            ("momentum encoders", nn.ModuleList(momentum) if momentum else None),
        ]

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Every weight (tied ones once), the momentum copies, queues, pointers and step
        counters: a BLIP checkpoint is self-contained and resumes where it stopped."""
        return unique_state(self)

    def begin_step(self, step: int) -> None:
        self.step.fill_(step)
        self._engine_steps = True

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision.gradient_checkpointing = enabled
        for text in (self.text_encoder, self.text_decoder):
            if text is not None:
                text.gradient_checkpointing = enabled

    def alpha_at(self, step: int) -> float:
        o = self.options
        if o.alpha_ramp_steps <= 0:
            return o.alpha
        return o.alpha * min(1.0, step / o.alpha_ramp_steps)

    # -- encoders -----------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` RGB in [0, 1] -> the ViT's input (mean/std normalised)."""
        s = self.config.vision.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a float tensor (B, 3, {s}, {s}) in [0, 1]; got {getattr(images, 'shape', type(images))}"
            )
        if images.shape[-2:] != (s, s):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the model takes {s}x{s}: resize them (Processor.images() does)"
            )
        return (images.float() - self.pixel_mean) / self.pixel_std

    def image_embeds(self, pixels: Tensor) -> Tensor:
        """Normalised ``(B, 3, S, S)`` -> ``(B, N, W)`` ViT tokens, CLS first."""
        return self.vision(pixels)

    def image_feat(self, embeds: Tensor) -> Tensor:
        """``(B, N, W)`` -> ``(B, E)`` L2-normalised ITC feature of the CLS token."""
        return F.normalize(self.vision_proj(embeds[:, 0, :]), dim=-1)

    def text_feat(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Unimodal encoder (``[CLS]`` first) -> ``(B, E)`` L2-normalised ITC feature."""
        return F.normalize(self.text_proj(self.text_encoder(ids, mask)[:, 0, :]), dim=-1)

    def itm_logits(self, ids: Tensor, mask: Tensor, embeds: Tensor, swap: bool = True) -> Tensor:
        """Image-grounded encoder: text ``(B, T)`` with image tokens ``(B, N, W)`` -> ``(B, 2)``
        (column 1 = match). ``swap`` puts [ENC] in column 0 (BLIP_Retrieval, BLIP_Pretrain);
        BLIP_ITM does not (``swap=False``)."""
        if swap:
            ids = with_first_token(ids, self.options.enc_token_id)
        return self.itm_head(self.text_encoder(ids, mask, embeds)[:, 0, :])

    def decoder_hidden(self, ids: Tensor, mask: Tensor, embeds: Tensor) -> Tensor:
        """Causal decoder on ``ids`` ([DEC] first) with cross-attention -> ``(B, T, H)``."""
        return self.text_decoder(ids, mask, embeds, causal=True)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """``(..., H)`` -> ``(..., V)`` with the LM head tied to the decoder's word embeddings."""
        return self.lm_head(hidden, self.text_decoder.word_embeddings.weight)

    # -- the reference's training forwards -----------------------------------------------------
    def _contrastive(
        self,
        pixels: Tensor,
        ids: Tensor,
        mask: Tensor,
        alpha: float,
        idx: Tensor | None,
        update: bool,
        momentum: bool,
    ) -> dict[str, Tensor]:
        """ITC with momentum distillation (steps 2-4 of BLIP's forward): features, momentum
        update, targets against ``[batch momentum features, queue]``, loss; then the enqueue."""
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        embeds = self.image_embeds(pixels)
        image_feat = self.image_feat(embeds)
        text_feat = self.text_feat(ids, mask)
        if idx is not None:
            idx_all = torch.cat([idx.view(1, -1), self.idx_queue.clone().detach()], dim=1)[0]
            out["sim_targets"] = losses.id_targets(idx, idx_all, image_feat.dtype)
        with torch.no_grad():
            if momentum:
                self.momentum_update()
            embeds_m = self.vision_m(pixels)
            image_feat_m = F.normalize(self.vision_proj_m(embeds_m[:, 0, :]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], 1)
            text_m = self.text_encoder_m(ids, mask)
            text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], 1)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            hard = out["sim_targets"] if idx is not None else losses.identity_targets(sim_i2t_m)
            out["sim_i2t_targets"] = losses.soft_targets(sim_i2t_m, hard, alpha)
            out["sim_t2i_targets"] = losses.soft_targets(sim_t2i_m, hard, alpha)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        out["loss_ita"] = losses.itc_loss(
            sim_i2t, sim_t2i, out["sim_i2t_targets"], out["sim_t2i_targets"]
        )
        out.update(
            image_embeds=embeds,
            image_embeds_m=embeds_m,
            image_feat=image_feat,
            text_feat=text_feat,
            image_feat_m=image_feat_m,
            text_feat_m=text_feat_m,
            sim_i2t=sim_i2t,
            sim_t2i=sim_t2i,
        )
        if update:
            self.enqueue(image_feat_m, text_feat_m, None if idx is None else gather_all(idx))
        return out

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idxs: Tensor | None = None) -> None:
        """Write every process's momentum features ``(n, E)`` (and image ids) at the pointer,
        wrapping around; BLIP requires ``queue_size % n == 0`` and then writes the same
        columns."""
        image_feats, text_feats = gather_all(image_feat), gather_all(text_feat)
        q = self.image_queue.shape[1]
        n = image_feats.shape[0]
        if n > q:
            image_feats, text_feats = image_feats[-q:], text_feats[-q:]
            idxs = None if idxs is None else idxs[-q:]
            n = q
        ptr = int(self.queue_ptr)
        cols = (ptr + torch.arange(n, device=self.image_queue.device)) % q
        self.image_queue[:, cols] = image_feats.t().to(self.image_queue.dtype)
        self.text_queue[:, cols] = text_feats.t().to(self.text_queue.dtype)
        if idxs is not None:
            self.idx_queue[:, cols] = idxs.view(1, -1).to(self.idx_queue.dtype)
        self.queue_ptr[0] = (ptr + n) % q

    def _matching(
        self,
        ids: Tensor,
        mask: Tensor,
        embeds: Tensor,
        weights_t2i: Tensor,
        weights_i2t: Tensor,
        neg_image_idx: Tensor | None,
        neg_text_idx: Tensor | None,
        world: bool,
    ) -> dict[str, Tensor]:
        """ITM with one hard negative image per text and one hard negative text per image
        (step 5). ``world``: candidates are every process's batch (image tokens gathered with
        gradient, so a negative trains the process that encoded it)."""
        b = ids.shape[0]
        ids_enc = with_first_token(ids, self.options.enc_token_id)
        if world:
            embeds_world = gather_with_grad(embeds)
            ids_world, mask_world = gather_padded(ids_enc, mask, self.options.pad_token_id)
        else:
            embeds_world, ids_world, mask_world = embeds, ids_enc, mask
        if neg_image_idx is None:  # all negative-image draws, then all negative-text draws
            neg_image_idx = losses.draw_negatives(weights_t2i)
        if neg_text_idx is None:
            neg_text_idx = losses.draw_negatives(weights_i2t)
        width = ids_world.shape[1]
        ids_enc = F.pad(ids_enc, (0, width - ids_enc.shape[1]), value=self.options.pad_token_id)
        mask = F.pad(mask, (0, width - mask.shape[1]))
        # one pass of 3B: positives, (text, negative image), (negative text, image)
        text_all = torch.cat([ids_enc, ids_enc, ids_world[neg_text_idx]])
        mask_all = torch.cat([mask, mask, mask_world[neg_text_idx]])
        image_all = torch.cat([embeds, embeds_world[neg_image_idx], embeds])
        hidden = self.text_encoder(text_all, mask_all, image_all)[:, 0, :]
        logits = self.itm_head(hidden)
        return {
            "itm.weights_t2i": weights_t2i,
            "itm.weights_i2t": weights_i2t,
            "itm.neg_image_idx": neg_image_idx,
            "itm.neg_text_idx": neg_text_idx,
            "itm.pos_cls": hidden[:b],
            "itm.neg_cls": hidden[b:],
            "itm.logits": logits,
            "loss_itm": F.cross_entropy(logits, losses.itm_labels(b, logits.device)),
        }

    def pretrain_step(
        self,
        pixels: Tensor,
        ids: Tensor,
        mask: Tensor,
        alpha: float,
        neg_image_idx: Tensor | None = None,
        neg_text_idx: Tensor | None = None,
        update: bool = True,
        momentum: bool = True,
    ) -> dict[str, Tensor]:
        """BLIP_Pretrain.forward on normalised ``pixels (B, 3, S, S)`` and ``ids (B, T)``
        ([CLS] caption [SEP], right-padded): ``loss_ita``, ``loss_itm``, ``loss_lm`` and every
        intermediate. Hard negatives are drawn unless given (``(B,)`` batch indices)."""
        out = self._contrastive(pixels, ids, mask, alpha, None, update, momentum)
        with torch.no_grad():
            w_t2i = losses.pretrain_negative_weights(out["sim_t2i"].detach())
            w_i2t = losses.pretrain_negative_weights(out["sim_i2t"].detach())
        embeds = out["image_embeds"]
        out.update(
            self._matching(ids, mask, embeds, w_t2i, w_i2t, neg_image_idx, neg_text_idx, False)
        )
        dec_ids = with_first_token(ids, self.options.dec_token_id)
        labels = dec_ids.masked_fill(dec_ids == self.options.pad_token_id, losses.IGNORE)
        hidden = self.decoder_hidden(dec_ids, mask, embeds)
        out["lm.input_ids"], out["lm.labels"], out["lm.hidden"] = dec_ids, labels, hidden
        out["loss_lm"] = losses.lm_loss(hidden, labels, self.lm_logits, self.config.label_smoothing)
        return out

    def retrieval_step(
        self,
        pixels: Tensor,
        ids: Tensor,
        mask: Tensor,
        idx: Tensor,
        alpha: float,
        neg_image_idx: Tensor | None = None,
        neg_text_idx: Tensor | None = None,
        update: bool = True,
        momentum: bool = True,
    ) -> dict[str, Tensor]:
        """BLIP_Retrieval.forward: ITC with image-id positives (batch and ``idx_queue``), ITM with
        negatives from every process (``negative_all_rank``) or from the local batch."""
        idx = idx.view(-1).to(self.idx_queue.device)
        out = self._contrastive(pixels, ids, mask, alpha, idx, update, momentum)
        image_feat, text_feat = out["image_feat"], out["text_feat"]
        world = self.options.negative_all_rank
        with torch.no_grad():
            idxs = gather_all(idx) if world else idx
            same = idx[:, None] == idxs[None, :]
            img_w = gather_all(image_feat) if world else image_feat
            txt_w = gather_all(text_feat) if world else text_feat
            w_i2t = losses.retrieval_negative_weights(image_feat @ txt_w.t() / self.temp, same)
            w_t2i = losses.retrieval_negative_weights(text_feat @ img_w.t() / self.temp, same)
        out.update(
            self._matching(
                ids, mask, out["image_embeds"], w_t2i, w_i2t, neg_image_idx, neg_text_idx, world
            )
        )
        return out

    def caption_step(self, pixels: Tensor, ids: Tensor, mask: Tensor, labels: Tensor):
        """BLIP_Decoder.forward: ``ids`` with [DEC] first, ``labels`` -100 on the prompt and pads;
        the token-mean label-smoothed LM loss."""
        embeds = self.image_embeds(pixels)
        hidden = self.decoder_hidden(ids, mask, embeds)
        loss = losses.lm_loss(hidden, labels, self.lm_logits, self.config.label_smoothing)
        return {"image_embeds": embeds, "hidden": hidden, "loss_lm": loss}

    # -- generation -----------------------------------------------------------------------------
    def _decoder_step(self, embeds: Tensor):
        """``step(ids, cache) -> (logits of the last position (N, V), cache)`` over ``embeds``."""

        def step(ids: Tensor, cache):
            if cache is None:
                hidden, cache = self.text_decoder.start(ids, torch.ones_like(ids), embeds)
            else:
                hidden, cache = self.text_decoder.step(ids, cache)
            return self.lm_logits(hidden[:, -1]), cache

        return step

    def generation_config(self, sample: bool = False, **overrides) -> GenerationConfig:
        """BLIP's generation settings from the options (beam search or nucleus sampling)."""
        o = self.options
        cfg = GenerationConfig(
            num_beams=o.num_beams,
            max_length=o.max_length,
            min_length=o.min_length,
            repetition_penalty=o.sample_repetition_penalty if sample else o.repetition_penalty,
            eos_token_id=o.sep_token_id,
            pad_token_id=o.pad_token_id,
            top_k=o.top_k,
            top_p=o.top_p,
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    @torch.no_grad()
    def generate(
        self,
        pixels: Tensor,
        prompt_ids: Tensor,
        sample: bool = False,
        cfg: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """BLIP_Decoder.generate on normalised ``pixels (B, 3, S, S)`` after ``prompt_ids (B, P)``
        ([DEC] a picture of): ``(ids (B, L) prompt included, beam scores (B,) | None)``."""
        if self.text_decoder is None:
            raise ValueError(
                f"head {self.task!r} has no decoder: captioning needs blip_caption or blip_pretrain"
            )
        cfg = cfg or self.generation_config(sample)
        embeds = self.image_embeds(pixels)
        if sample:
            return gen.sample(self._decoder_step(embeds), prompt_ids, cfg, generator), None
        embeds = embeds.repeat_interleave(cfg.num_beams, dim=0)
        return gen.beam_search(self._decoder_step(embeds), prompt_ids, cfg)

    def prompt_ids(self, tokenizer, batch: int, prompt: str | None = None) -> Tensor:
        """BLIP's generation prompt: ``tokenizer(prompt)`` with [DEC] first and the final [SEP]
        dropped, repeated ``batch`` times ``(B, P)``."""
        ids = tokenizer(self.options.prompt if prompt is None else prompt)["input_ids"][:-1]
        ids[0] = self.options.dec_token_id
        return torch.tensor([ids] * batch, device=self.step.device)

    @torch.no_grad()
    def caption(
        self,
        images: Tensor,
        processor,
        prompt: str | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
        **overrides,
    ) -> list[str]:
        """Captions of ``images (B, 3, S, S)`` in [0, 1], decoded as BLIP does (special tokens
        skipped, the prompt cut off by characters). ``overrides``: num_beams, max_length,
        min_length, repetition_penalty, top_p (None keeps BLIP's)."""
        self.eval()
        prompt = self.options.prompt if prompt is None else prompt
        pixels = self.normalize(images.to(self.step.device))
        ids, _ = self.generate(
            pixels,
            self.prompt_ids(processor.tokenizer, pixels.shape[0], prompt),
            sample,
            self.generation_config(sample, **overrides),
            generator,
        )
        return [decode_caption(processor.tokenizer, row.tolist(), prompt) for row in ids]

    # -- the engine's training step -----------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        image_idx: Tensor | None = None,
        **_: object,
    ) -> BlipOutput:
        """One training forward of the task on a prismkit batch (``[CLS] prompt caption
        [SEP]``, labels on the caption). Training updates the momentum encoders once per
        optimizer step (before the momentum features), enqueues, and ramps alpha by optimizer
        steps; without ``labels`` the decoder's logits are returned."""
        pixels = self.normalize(images)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            if self.text_decoder is None:
                raise ValueError(f"head {self.task!r} has no decoder: pass labels to get losses")
            ids = with_first_token(input_ids, self.options.dec_token_id)
            hidden = self.decoder_hidden(ids, attention_mask, self.image_embeds(pixels))
            return BlipOutput(None, self.lm_logits(hidden))
        if self.task == CAPTION:
            ids = with_first_token(input_ids, self.options.dec_token_id)
            out = self.caption_step(pixels, ids, attention_mask, labels)
            return BlipOutput(out["loss_lm"], parts={"lm": out["loss_lm"].detach()})
        training = self.training and torch.is_grad_enabled()
        step = int(self.step)
        momentum = training and (not self._engine_steps or int(self.momentum_step) != step)
        alpha = self.alpha_at(step)
        ids, mask = caption_tokens(input_ids, attention_mask, labels)
        if self.task == PRETRAIN:
            out = self.pretrain_step(pixels, ids, mask, alpha, update=training, momentum=momentum)
            parts = {"itc": out["loss_ita"], "itm": out["loss_itm"], "lm": out["loss_lm"]}
        else:
            if image_idx is None:
                raise ValueError(
                    "head 'blip_retrieval' needs image_idx (B,): the image id of each caption"
                )
            out = self.retrieval_step(
                pixels, ids, mask, image_idx, alpha, update=training, momentum=momentum
            )
            parts = {"itc": out["loss_ita"], "itm": out["loss_itm"]}
        if momentum:
            self.momentum_step.fill_(step)
        if training and not self._engine_steps:
            self.step += 1  # no engine: BLIP's own loop, one optimizer step per forward
        loss = sum(parts.values())
        return BlipOutput(loss, parts={k: v.detach() for k, v in parts.items()})


def config_path(name: str) -> Path:
    """A shipped BLIP config TOML."""
    return Path(__file__).resolve().parent / "configs" / f"{name}.toml"
