"""The tied word embeddings' gradient as one dense tensor, formed in place.

Training reads the word embeddings twice: the lookup (a few hundred rows) and the tied LM head
(every row). Left to autograd, the two gradients meet in its input buffer, and with a sparse
lookup gradient the sum is formed out of place when the head's dense gradient arrives first
(autograd's in-place path skips sparse tensors): a second ``(V, D)`` buffer at the very end of
the backward, which is where a BASE step's memory peaks (bench/README.md, "Where the training
peak is").

Here the head defers its ``(V, D)`` product ``g^T x`` to the lookup's backward, which computes
it into a fresh tensor, adds its own rows in place and hands autograd a single dense gradient.
The sum is the same (summed in another order: float32 rounding).

Ordering: a lookup's backward runs after every head whose input depends on the lookup's output.
A head defers to the :class:`TiedLink` of the decoder's latest lookup only while that lookup's
backward has not run; otherwise it returns its product itself. A product still deferred when
the backward ends (that lookup was not part of the backward) is added to ``weight.grad`` by an
end-of-backward callback, with a warning: distributed reducers, which hook the parameter's
gradient accumulation, would have missed it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class TiedLink:
    """One lookup of the tied weight and the head products deferred to its backward."""

    __slots__ = ("done", "deferred")

    def __init__(self) -> None:
        self.done = False  # the lookup's backward has run
        self.deferred: list[tuple[Tensor, Tensor]] = []  # (g (N, V), x (N, D)) per head


def _product(deferred: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``sum g^T x`` over the deferred heads, into one fresh ``(V, D)`` tensor."""
    (g, x), *rest = deferred
    out = g.t().mm(x)
    for g, x in rest:
        out.addmm_(g.t(), x)
    return out


def _flush(link: TiedLink, weight: Tensor) -> None:
    """End of backward: products whose lookup did not run go straight into ``weight.grad``."""
    if not link.deferred:
        return
    dense, link.deferred = _product(link.deferred), []
    warnings.warn(
        "a tied LM head's gradient was added after the backward (its hidden states did not "
        "come from the decoder's latest forward); distributed gradient reducers miss it",
        RuntimeWarning,
        stacklevel=1,
    )
    weight.grad = dense if weight.grad is None else weight.grad + dense


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None, link: TiedLink):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.link, ctx.weight_shape = padding_idx, link, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        link = ctx.link
        link.done = True
        index = ids.reshape(-1)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # the padding row gets no gradient (F.embedding)
            keep = index != ctx.padding_idx
            index, rows = index[keep], rows[keep]
        deferred, link.deferred = link.deferred, []
        if not deferred:  # no head: the sparse rows, as F.embedding(sparse=True) gives them
            sparse = torch.sparse_coo_tensor(
                index[None], rows, ctx.weight_shape, check_invariants=False
            )
            return None, sparse, None, None
        dense = _product(deferred)
        dense.index_add_(0, index, rows.to(dense.dtype))
        return None, dense, None, None


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, link: TiedLink | None):
        ctx.save_for_backward(x, weight)
        ctx.link, ctx.has_bias = link, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = g.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            link = ctx.link
            if link is not None and not link.done:
                if not link.deferred:
                    torch.autograd.Variable._execution_engine.queue_callback(
                        lambda: _flush(link, weight)
                    )
                link.deferred.append((g2, x2))
            else:
                grad_w = _product([(g2, x2)])
        return grad_x, grad_w, grad_b, None


def applies(weight: Tensor) -> bool:
    """Whether a lookup of ``weight`` now should take :func:`lookup` (training in float32 eager
    mode; autocast and ``torch.compile`` keep autograd's own ops)."""
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled(weight.device.type)
        and not torch.compiler.is_compiling()
    )


def lookup(ids: Tensor, weight: Tensor, padding_idx: int | None, link: TiedLink) -> Tensor:
    """``F.embedding(ids, weight, padding_idx)`` whose backward also forms the gradient of the
    heads deferred to ``link``."""
    return _Lookup.apply(ids, weight, padding_idx, link)


def head(x: Tensor, weight: Tensor, bias: Tensor | None, link: TiedLink | None) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is deferred to ``link``'s lookup while
    that lookup's backward has not run."""
    return _Head.apply(x, weight, bias, link)
