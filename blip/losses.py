"""BLIP's losses and sampling rules as pure functions (``models/blip_pretrain.py``,
``models/blip_retrieval.py``, ``models/med.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def identity_targets(sim: Tensor) -> Tensor:
    """Pre-training's hard ITC targets for ``sim (B, B + Q)``: 1 at column ``b`` of row ``b``
    (the batch comes first, then the queue), 0 elsewhere."""
    t = torch.zeros_like(sim)
    t.fill_diagonal_(1.0)
    return t


def id_targets(idx: Tensor, idx_all: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Retrieval's hard ITC targets: every column whose image id equals the row's is a positive,
    row-normalised. ``idx (B,)``, ``idx_all (B + Q,)`` (batch ids, then the id queue) ->
    ``(B, B + Q)``. COCO's five captions of an image are positives of each other."""
    pos = (idx[:, None] == idx_all[None, :]).to(dtype)
    return pos / pos.sum(1, keepdim=True)


def soft_targets(sim_m: Tensor, hard: Tensor, alpha: float) -> Tensor:
    """Momentum distillation: ``alpha * softmax(sim_m) + (1 - alpha) * hard``."""
    return alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * hard


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, t_i2t: Tensor, t_t2i: Tensor) -> Tensor:
    """``(mean_b -sum(log_softmax(sim_i2t) * t_i2t) + the same for t2i) / 2``."""
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * t_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t_t2i, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def pretrain_negative_weights(sim: Tensor) -> Tensor:
    """BLIP_Pretrain's hard-negative sampling weights from ``sim (B, B + Q)``:
    ``softmax(sim[:, :B]) + 1e-4`` with the diagonal (the positive) set to 0. Rows are not
    renormalised; ``torch.multinomial`` normalises."""
    b = sim.shape[0]
    w = F.softmax(sim[:, :b].float(), dim=1) + 1e-4
    w.fill_diagonal_(0)
    return w


def retrieval_negative_weights(sim: Tensor, same: Tensor) -> Tensor:
    """BLIP_Retrieval's: ``softmax(sim)`` with every column of the same image id set to 0 (no
    +1e-4). ``sim (B, N)``, ``same (B, N)`` bool."""
    return F.softmax(sim.float(), dim=1).masked_fill(same, 0.0)


def draw_negatives(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One ``torch.multinomial(weights[b], 1)`` draw per row, row by row as the reference loops
    (so a seeded run draws what it draws). ``(B, N) -> (B,)`` int64.

    A row with no positive weight (every candidate shares the row's image id) has no
    negative: raise, naming the fix."""
    if bool((weights.sum(1) <= 0).any()):
        raise ValueError(
            "ITM hard negatives: a row has no candidate of another image (every sample in the "
            "batch shows the same image); use larger or shuffled batches"
        )
    return torch.stack(
        [torch.multinomial(weights[b], 1, generator=generator)[0] for b in range(weights.shape[0])]
    )


def itm_labels(b: int, device: torch.device) -> Tensor:
    """``[1] * B + [0] * 2B``: positives, then (text, negative image), then (negative text, image)."""
    return torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(device)


def lm_token_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Per-token label-smoothed CE of next-token ``logits (B, T, V)`` against ``labels (B, T)``
    aligned with the inputs (``logits[:, :-1]`` predicts ``labels[:, 1:]``): ``(B, T - 1)``,
    0 where the target is -100."""
    b, t, v = logits.shape
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return loss.view(b, t - 1)


def lm_loss(hidden: Tensor, labels: Tensor, head, label_smoothing: float = 0.1) -> Tensor:
    """BLIP's LM loss: the MEAN over every non-ignored target token of the batch (not per
    sample) of the label-smoothed CE. ``hidden (B, T, H)`` -> the vocabulary projection
    ``head(h) -> (N, V)`` runs only at the N positions that have a target."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if not bool(keep.any()):
        raise ValueError("batch has no target tokens: every label is -100")
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], label_smoothing=label_smoothing)
