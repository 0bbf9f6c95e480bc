"""``blip_frozen``: BLIP's objectives (ITC + ITM + LM) as a head on Prismer's frozen backbones.

This is NOT BLIP's model (that is the ``blip`` architecture, ``prismkit.blip.model``): it puts
BLIP's three losses on a Prismer/PrismerZ model whose vision and language backbones stay frozen
(with experts, adaptors and a resampler), an approximation for that setting. The three passes
are the model's one language model (``TextDecoder``) with different masks:

- unimodal text encoder (ITC): ``language(ids, None, mask, prefix_len=length)``: no
  cross-attention, bidirectional self-attention;
- image-grounded text encoder (ITM): ``language(ids, vision, mask, prefix_len=length)``:
  bidirectional, with cross-attention to the vision tokens;
- image-grounded decoder (LM): ``language(input_ids, vision, attention_mask, prefix_len)``:
  causal after the prompt, exactly as the ``lm`` head.

The ITC/ITM text is ``[BOS] caption [EOS]`` (the training batch's target tokens; the prompt is
dropped, as BLIP's encoder never sees it); BLIP's [ENC]/[DEC] marker tokens are not added (the
vocabulary belongs to the frozen backbone), the mask alone tells the passes apart.

Momentum encoder: the backbones are frozen, so BLIP's momentum copy of the image and text
encoders reduces to momentum copies of what this objective trains on the ITC path: exactly the
two ITC projections (``vision_proj_m``, ``text_proj_m``, buffers). The trainable parts inside the
backbones (adaptors, norms, embeddings) are shared by the online and momentum paths: the
momentum features are the online CLS tokens (detached) through the momentum projections, which
saves BLIP's second pass of both encoders.

State that is not a parameter (momentum projections, queues, pointers, the optimizer step and
whether the momentum copies were initialised) is held in buffers, which Prismer checkpoints
save with the objective: a resumed run continues with the same queues and ramps. The momentum
update and the alpha ramp count optimizer steps (``begin_step``), not forward calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.distributed import gather_all, gather_padded, gather_with_grad
from prismkit.core.distributed import rank as _rank
from prismkit.core.heads import IGNORE, lm_loss


# -- pieces, each a pure function --------------------------------------------------------------
def caption_tokens(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """The encoder text of a training batch: the first real token (BOS) and the target tokens
    (``labels != -100``: caption and EOS), packed to the left. ``(B, T)`` each -> ``(B, T')``."""
    real = attention_mask.bool()
    first = (attention_mask.cumsum(1) == 1) & real
    keep = first | ((labels != IGNORE) & real)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    lengths = keep.sum(1)
    width = int(lengths.max())
    mask = (torch.arange(width, device=input_ids.device)[None] < lengths[:, None]).long()
    ids = input_ids.gather(1, order[:, :width]) * mask
    return ids, mask


def text_hash(ids: Tensor, mask: Tensor) -> Tensor:
    """``(B, T)`` token ids -> ``(B,)`` int64 hash of the real tokens: equal captions, equal hash
    (collisions are astronomically unlikely for caption-length inputs)."""
    x = (ids * mask).long()
    powers = torch.full((x.shape[1],), 1_000_003, dtype=torch.long, device=x.device).cumprod(0)
    return (x * powers).sum(1)


def sample_hard_negatives(
    sim: Tensor,
    positive: Tensor,
    generator: torch.Generator | None = None,
    same: Tensor | None = None,
) -> Tensor:
    """One negative per row, drawn with probability ``softmax(sim) + 1e-4`` and the positive
    zeroed (BLIP). ``sim (B, N)``, ``positive (B,)`` column of each row's match -> ``(B,)``.
    ``same (B, N)`` bool marks further columns that are positives too (an identical caption:
    easy-vqa has 24 distinct captions); they are never drawn, unless a row has nothing else."""
    if sim.shape[1] < 2:
        raise ValueError("ITM hard negatives need at least 2 image-text pairs per (global) batch")
    weights = sim.float().softmax(1) + 1e-4
    if same is not None:
        only_same = same.all(1)  # every candidate is a duplicate: fall back to the plain rule
        weights = weights.masked_fill(same & ~only_same[:, None], 0.0)
    weights.scatter_(1, positive[:, None], 0.0)
    return torch.multinomial(weights, 1, generator=generator)[:, 0]


def soft_itc_loss(
    sim: Tensor, sim_m: Tensor, alpha: float, positives: Tensor | None = None
) -> Tensor:
    """Contrastive loss against ``alpha * softmax(sim_m) + (1 - alpha) * hard``. ``hard`` is the
    one-hot of column ``b`` in row ``b``, or, with ``positives (B, B + Q)`` bool, uniform over every
    positive column (BLIP's id-based targets: identical captions are not negatives).
    ``sim``, ``sim_m (B, B + Q)`` (batch first, then the queue)."""
    b = sim.shape[0]
    if positives is None:
        hard = torch.zeros_like(sim)
        hard[:, :b] = torch.eye(b, device=sim.device, dtype=sim.dtype)
    else:
        hard = positives.to(sim.dtype)
        hard = hard / hard.sum(1, keepdim=True)
    target = alpha * sim_m.softmax(1) + (1 - alpha) * hard
    return -(sim.log_softmax(1) * target).sum(1).mean()


class FrozenBLIPObjective(nn.Module):
    """ITC + ITM + LM on one batch (one image encoding, three text passes).

    Args:
        width: the language model's width (the vision tokens are projected to it).
        label_smoothing: LM label smoothing (BLIP: 0.1).
        embed_dim: ITC projection size (256).
        queue_size: momentum features kept per modality (57,600).
        momentum: EMA factor of the momentum projections (0.995).
        alpha: momentum-distillation weight of the soft targets (0.4).
        alpha_ramp_steps: optimizer steps over which alpha ramps linearly from 0 (0 = none).
        temperature: initial ITC temperature (0.07), learnt, clamped to [0.001, 0.5].
        share_weights: BLIP shares every encoder/decoder weight except self-attention. In
            prismkit the three passes run through the one language model, so every weight is
            shared, self-attention included (frozen in the pretrain stage); False would need a
            second self-attention per layer and is refused.
    """

    name = "blip_frozen"

    def __init__(
        self,
        *,
        width: int | None = None,
        label_smoothing: float = 0.1,
        embed_dim: int = 256,
        queue_size: int = 57600,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_ramp_steps: int = 2000,
        temperature: float = 0.07,
        share_weights: bool = True,
        **_: object,
    ) -> None:
        super().__init__()
        if width is None:
            raise ValueError(
                "head 'blip' needs the language width: the model builder must pass "
                "width=config.language.width to the head's constructor"
            )
        if not share_weights:
            raise ValueError(
                "share_weights=False is not supported: the ITC, ITM and LM passes run through the "
                "model's one language model (prismkit shares every text weight)"
            )
        if queue_size < 1 or not 0 <= momentum <= 1 or not 0 <= alpha <= 1:
            raise ValueError(
                f"need queue_size >= 1, momentum and alpha in [0, 1]; got {queue_size}, {momentum}, {alpha}"
            )
        self.label_smoothing = label_smoothing
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_ramp_steps = alpha_ramp_steps
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(temperature))
        for name in ("vision_proj", "text_proj"):
            online = getattr(self, name)
            self.register_buffer(f"{name}_m_weight", online.weight.detach().clone())
            self.register_buffer(f"{name}_m_bias", online.bias.detach().clone())
        self.register_buffer("image_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("text_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("hash_queue", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # the optimizer step (``begin_step``) and the step of the last momentum update (-1: the
        # copies are not initialised yet: the first update copies the online weights)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("momentum_step", torch.full((), -1, dtype=torch.long))
        self._engine_steps = False

    # -- features ---------------------------------------------------------------------------
    def image_features(self, vision: Tensor) -> Tensor:
        """Vision tokens ``(B, Nv, D)`` -> normalised ITC features ``(B, E)`` (CLS token)."""
        return F.normalize(self.vision_proj(vision[:, 0]).float(), dim=-1)

    def text_features(self, model, ids: Tensor, mask: Tensor) -> Tensor:
        """Unimodal encoder: ``(B, T)`` ids and mask -> normalised ITC features ``(B, E)``."""
        hidden, _ = model.language(ids, None, mask, prefix_len=mask.sum(1))
        return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def itm_logits(self, model, ids: Tensor, mask: Tensor, vision: Tensor) -> Tensor:
        """Image-grounded encoder: ``(B, T)`` text with ``(B, Nv, D)`` vision -> ``(B, 2)``
        logits (index 1 = match)."""
        hidden, _ = model.language(ids, vision, mask, prefix_len=mask.sum(1))
        return self.itm_head(hidden[:, 0]).float()

    @torch.no_grad()
    def momentum_features(self, cls_image: Tensor, cls_text: Tensor) -> tuple[Tensor, Tensor]:
        """CLS tokens ``(B, D)`` -> normalised momentum features ``(B, E)`` (image, text)."""
        img = F.linear(cls_image, self.vision_proj_m_weight, self.vision_proj_m_bias)
        txt = F.linear(cls_text, self.text_proj_m_weight, self.text_proj_m_bias)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    # -- state updates -----------------------------------------------------------------------
    def _pairs(self) -> list[tuple[nn.Linear, Tensor, Tensor]]:
        return [
            (self.vision_proj, self.vision_proj_m_weight, self.vision_proj_m_bias),
            (self.text_proj, self.text_proj_m_weight, self.text_proj_m_bias),
        ]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m <- m * p_m + (1 - m) * p`` for each momentum copy (the first call copies)."""
        m = self.momentum if int(self.momentum_step) >= 0 else 0.0
        for online, w_m, b_m in self._pairs():
            w_m.mul_(m).add_(online.weight.detach().to(w_m.dtype), alpha=1 - m)
            b_m.mul_(m).add_(online.bias.detach().to(b_m.dtype), alpha=1 - m)
        self.momentum_step.fill_(int(self.steps))

    def begin_step(self, step: int) -> None:
        """The engine's optimizer step: the momentum update runs once per step (on its first
        micro-batch) and alpha ramps by steps, whatever the gradient accumulation."""
        self.steps.fill_(step)
        self._engine_steps = True

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, hashes: Tensor | None = None) -> None:
        """Write ``(N, E)`` momentum features (all processes') and their caption hashes at the
        pointer, wrapping around."""
        q = self.image_queue.shape[0]
        image_feat, text_feat = image_feat[-q:], text_feat[-q:]
        if hashes is not None:
            hashes = hashes[-q:]
        n = image_feat.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % q
        self.image_queue[idx] = image_feat.to(self.image_queue.dtype)
        self.text_queue[idx] = text_feat.to(self.text_queue.dtype)
        if hashes is not None:
            self.hash_queue[idx] = hashes.to(self.hash_queue.device)
        self.queue_ptr.copy_((self.queue_ptr + n) % q)
        self.queue_filled.copy_((self.queue_filled + n).clamp(max=q))

    def current_alpha(self) -> float:
        if self.alpha_ramp_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, int(self.steps) / self.alpha_ramp_steps)

    # -- the objective -----------------------------------------------------------------------
    def forward(
        self,
        model,
        *,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor,
        experts=None,
        prefix_len: Tensor | None = None,
        **_: object,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        update = self.training and torch.is_grad_enabled()
        uninitialised = int(self.momentum_step) < 0
        new_step = not self._engine_steps or int(self.momentum_step) != int(self.steps)
        if (update and new_step) or uninitialised:
            self.momentum_update()
        vision = model.encode_image(images, experts)  # (B, Nv, D): the one image encoding
        ids, mask = caption_tokens(input_ids, attention_mask, labels)
        b = ids.shape[0]

        # ITC: unimodal text encoder vs image CLS, momentum features + queues, soft targets
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        hidden_txt, _ = model.language(ids, None, mask, prefix_len=mask.sum(1))
        image_feat = F.normalize(self.vision_proj(vision[:, 0]).float(), dim=-1)
        text_feat = F.normalize(self.text_proj(hidden_txt[:, 0]).float(), dim=-1)
        with torch.no_grad():
            image_m, text_m = self.momentum_features(
                vision[:, 0].detach(), hidden_txt[:, 0].detach()
            )
            valid = torch.arange(self.image_queue.shape[0], device=ids.device) < self.queue_filled
            image_all = torch.cat([image_m, self.image_queue[valid]])
            text_all = torch.cat([text_m, self.text_queue[valid]])
            hashes = text_hash(ids, mask)
            positives = hashes[:, None] == torch.cat([hashes, self.hash_queue[valid]])[None, :]
            alpha = self.current_alpha()
            sim_i2t_m = image_m @ text_all.t() / self.temp
            sim_t2i_m = text_m @ image_all.t() / self.temp
        sim_i2t = image_feat @ text_all.t() / self.temp
        sim_t2i = text_feat @ image_all.t() / self.temp
        itc = (
            soft_itc_loss(sim_i2t, sim_i2t_m, alpha, positives)
            + soft_itc_loss(sim_t2i, sim_t2i_m, alpha, positives)
        ) / 2

        # ITM: positives, plus one hard negative text per image and one negative image per text
        vision_world = gather_with_grad(vision)  # negatives train the process that encoded them
        ids_world, mask_world = gather_padded(ids, mask)
        with torch.no_grad():
            positive = torch.arange(b, device=ids.device) + _rank() * b
            same = hashes[:, None] == text_hash(ids_world, mask_world)[None, :]
            neg_text = sample_hard_negatives(
                image_feat @ gather_all(text_feat).t() / self.temp, positive, same=same
            )
            neg_image = sample_hard_negatives(
                text_feat @ gather_all(image_feat).t() / self.temp, positive, same=same
            )
        width = ids_world.shape[1]
        ids_p, mask_p = (
            F.pad(ids, (0, width - ids.shape[1])),
            F.pad(mask, (0, width - ids.shape[1])),
        )
        itm_ids = torch.cat([ids_p, ids_p, ids_world[neg_text]])
        itm_mask = torch.cat([mask_p, mask_p, mask_world[neg_text]])
        itm_vision = torch.cat([vision, vision_world[neg_image], vision])
        logits = self.itm_logits(model, itm_ids, itm_mask, itm_vision)
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        itm = F.cross_entropy(logits, itm_labels)

        # LM: image-grounded causal decoder on the batch as given
        hidden, _ = model.language(input_ids, vision, attention_mask, prefix_len=prefix_len)
        lm = lm_loss(hidden, labels, model.language.logits, self.label_smoothing)

        if update:
            self.enqueue(gather_all(image_m), gather_all(text_m), gather_all(hashes))
            if not self._engine_steps:
                self.steps += 1  # no engine: one optimizer step per forward
        loss = itc + itm + lm
        return loss, {"itc": itc.detach(), "itm": itm.detach(), "lm": lm.detach()}


class FrozenScorer:
    """A Prismer model with head ``blip_frozen`` as a retrieval scorer (images in [0, 1]; the
    enabled experts run on the fly)."""

    def __init__(self, model, host) -> None:
        from prismkit.labels.feeder import ExpertFeeder

        self.model, self.objective = model, model.objective
        self.feeder = ExpertFeeder(model, host, compute_missing=True)

    def image_embeds(self, pixels: Tensor) -> Tensor:
        keys = [f"retrieval-{i}" for i in range(pixels.shape[0])]
        return self.model.encode_image(pixels, self.feeder(pixels, keys))

    def image_feat(self, embeds: Tensor) -> Tensor:
        return self.objective.image_features(embeds)

    def text_feat(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.objective.text_features(self.model, ids, mask)

    def itm_logits(self, ids: Tensor, mask: Tensor, embeds: Tensor, swap: bool = True) -> Tensor:
        return self.objective.itm_logits(self.model, ids, mask, embeds)
