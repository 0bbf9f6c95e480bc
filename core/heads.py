"""Heads/objectives: the model and a batch -> a loss. Built-in: next-token LM.

An objective is an ``nn.Module`` owned by the model (its parameters train, and it runs inside
the model's forward, so distributed wrappers see it). Contract::

    objective(model, images=..., input_ids=..., attention_mask=..., labels=..., experts=...,
              prefix_len=...) -> (loss, {"part": value, ...})

An objective that sets ``accepts_stem_features = True`` also takes ``stem_features`` (the frozen
image stem's output, cached per image by the training loop) and hands it to
``model.encode_image``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.hookspecs import hookimpl

IGNORE = -100


REDUCTIONS = ("sample_sum", "token_mean")


def sequence_losses(hidden: Tensor, labels: Tensor, logits, label_smoothing: float) -> Tensor:
    """``(B,)`` summed next-token cross-entropy (label-smoothed) of each sequence: position t
    predicts label t + 1, -100 labels are skipped (a sequence without targets gets 0)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    per_token = F.cross_entropy(
        logits(hidden[:, :-1][keep]).float(),
        targets[keep],
        label_smoothing=label_smoothing,
        reduction="none",
    )
    rows = keep.nonzero()[:, 0]
    return per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)


def lm_loss(
    hidden: Tensor,
    labels: Tensor,
    logits,
    label_smoothing: float,
    reduction: str = "token_mean",
    weights: Tensor | None = None,
) -> Tensor:
    """Next-token cross-entropy with label smoothing on the positions whose label is not -100.

    ``hidden (B, T, D)``, ``labels (B, T)`` aligned with the inputs (position t predicts label
    t + 1); the vocabulary projection runs only where a label is. ``reduction``: "token_mean"
    averages over every target token of the batch; "sample_sum" (Prismer) sums each sequence's
    token losses, then averages over the B sequences, weighted by ``weights (B,)`` when given
    (``mean(weights * per_sequence)``, Prismer's VQA answer weights)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if not bool(keep.any()):
        raise ValueError("batch has no target tokens: every label is -100")
    flat = logits(hidden[:, :-1][keep]).float()
    if reduction == "token_mean" and weights is None:
        return F.cross_entropy(flat, targets[keep], label_smoothing=label_smoothing)
    per_token = F.cross_entropy(
        flat, targets[keep], label_smoothing=label_smoothing, reduction="none"
    )
    rows = keep.nonzero()[:, 0]
    per_sample = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
    if reduction == "token_mean":  # weighted token mean
        w = weights.to(per_token)[rows]
        return (per_token * w).sum() / w.sum()
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


class LMObjective(nn.Module):
    """Prismer's objective: next-token LM with label smoothing; the prompt (BOS, question,
    "A picture of") and padding carry no loss. Optional per-sample ``weights`` (VQA)."""

    name = "lm"
    # forward takes ``stem_features`` (the frozen stem's cached output) for the image encoding
    accepts_stem_features = True

    def __init__(
        self, *, label_smoothing: float = 0.1, reduction: str = "sample_sum", **_: object
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(
        self,
        model,
        *,
        images,
        input_ids,
        attention_mask=None,
        labels,
        experts=None,
        prefix_len=None,
        weights: Tensor | None = None,
        stem_features: Tensor | None = None,
        **_: object,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        vision = model.encode_image(images, experts, stem_features=stem_features)
        hidden, _ = model.language(input_ids, vision, attention_mask, prefix_len=prefix_len)
        loss = lm_loss(
            hidden, labels, model.language.logits, self.label_smoothing, self.reduction, weights
        )
        return loss, {"lm": loss.detach()}


@hookimpl
def register_heads(register) -> None:
    register(LMObjective)
