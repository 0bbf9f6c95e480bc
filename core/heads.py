"""Heads/objectives: decoder logits and a batch -> a loss. Built-in: next-token LM."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from prismkit.core.hookspecs import hookimpl

IGNORE = -100


class LMObjective:
    """Next-token cross-entropy with label smoothing; positions labelled -100 (BOS, prompt,
    padding) carry no loss. ``hidden (B, T, D)``, ``labels (B, T)`` aligned with the inputs;
    the vocabulary projection runs only where a label is, not over the whole sequence."""

    name = "lm"

    def __init__(self, *, label_smoothing: float = 0.1) -> None:
        self.label_smoothing = label_smoothing

    def __call__(
        self, hidden: Tensor, labels: Tensor, logits: Callable[[Tensor], Tensor]
    ) -> Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if not bool(keep.any()):
            raise ValueError("batch has no target tokens: every label is -100")
        return F.cross_entropy(
            logits(hidden[:, :-1][keep]), targets[keep], label_smoothing=self.label_smoothing
        )


@hookimpl
def register_heads(register) -> None:
    register(LMObjective)
