"""Heads/objectives: the model and a batch -> a loss. Built-in: next-token LM.

An objective is an ``nn.Module`` owned by the model (its parameters train, and it runs inside
the model's forward, so distributed wrappers see it). Contract::

    objective(model, images=..., input_ids=..., attention_mask=..., labels=..., experts=...,
              prefix_len=...) -> (loss, {"part": value, ...})
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.hookspecs import hookimpl

IGNORE = -100


def lm_loss(hidden: Tensor, labels: Tensor, logits, label_smoothing: float) -> Tensor:
    """Next-token cross-entropy on the positions whose label is not -100. ``hidden (B, T, D)``,
    ``labels (B, T)`` aligned with the inputs; the vocabulary projection runs only where a label
    is, not over the whole sequence."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if not bool(keep.any()):
        raise ValueError("batch has no target tokens: every label is -100")
    return F.cross_entropy(
        logits(hidden[:, :-1][keep]), targets[keep], label_smoothing=label_smoothing
    )


class LMObjective(nn.Module):
    """Prismer's objective: next-token LM with label smoothing; the prompt (BOS, question,
    "a picture of") and padding carry no loss."""

    name = "lm"

    def __init__(self, *, label_smoothing: float = 0.1, **_: object) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

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
        **_: object,
    ) -> tuple[Tensor, dict[str, float]]:
        vision = model.encode_image(images, experts)
        hidden, _ = model.language(input_ids, vision, attention_mask, prefix_len=prefix_len)
        loss = lm_loss(hidden, labels, model.language.logits, self.label_smoothing)
        return loss, {"lm": loss.detach()}


@hookimpl
def register_heads(register) -> None:
    register(LMObjective)
