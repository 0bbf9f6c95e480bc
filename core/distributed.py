"""Gathering tensors across processes, with and without gradient (identity on one process).

Contrastive objectives (BLIP's ITC queues, ITM hard negatives drawn from every process) need
other processes' features. :func:`gather_all` is a constant (no gradient); in
:func:`gather_with_grad` every slice stays connected to the process that owns it: the gradient
that any process's loss sends to a slice is summed (all-reduce) and handed back to its owner,
as BLIP's ``all_gather_with_grad`` (``GatherLayer``) does. With DDP's gradient averaging on top,
a hard negative drawn from another process trains the encoder that produced it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def gather_all(x: Tensor) -> Tensor:
    """``(B, ...)`` per process -> ``(world * B, ...)`` in rank order, as a constant. Every
    process must pass the same shape."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's gradient for every slice, summed
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """``(B, ...)`` per process -> ``(world * B, ...)`` in rank order; the gradient of every
    process's loss with respect to slice ``r`` reaches process ``r``'s ``x`` (summed over
    processes). Every process must call it (it communicates in the backward pass too)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather_padded(ids: Tensor, mask: Tensor, pad: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids and masks ``(B, T)`` of every process, right-padded to the longest ``T``."""
    if not is_distributed():
        return ids, mask
    width = torch.tensor([ids.shape[1]], device=ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    extra = int(width.item()) - ids.shape[1]
    ids = torch.nn.functional.pad(ids, (0, extra), value=pad)
    mask = torch.nn.functional.pad(mask, (0, extra))
    return gather_all(ids), gather_all(mask)
