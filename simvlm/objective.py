"""SimVLM's prefix-LM objective: a random split per sample, the prefix bidirectional, the suffix
causal, the loss on the suffix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prismkit.core.heads import IGNORE, lm_loss
from prismkit.core.model import ExpertInput, PrismerModel, SemanticInput

# timm ResNet modules up to the end of stage 3 (stride 16); same names as in timm's checkpoints


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
