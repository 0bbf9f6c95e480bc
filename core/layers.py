"""Transformer building blocks shared by the backbones, the resampler and the decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# elements per chunk of the elementwise activations: three passes over 1 MiB stay in L2, where
# three passes over a (4, 261, 3072) MLP activation (12.8 MiB) each went to memory and each
# temporary was a fresh page-faulted buffer (5-6x slower at the BASE shapes, bench/README.md)
_CHUNK = 1 << 18


def _chunks(*tensors: Tensor):
    """Matching flat chunks of same-shaped tensors (viewed flat when contiguous, else copied)."""
    flat = [t.reshape(-1) for t in tensors]
    n = flat[0].numel()
    for start in range(0, n, _CHUNK):
        yield [f[start : start + _CHUNK] for f in flat]


class _QuickGELU(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` (CLIP's activation). Both passes are the plain formulas (the same
    float operations per element), computed chunk by chunk so the temporaries stay in cache;
    only ``x`` is kept for the backward (the sigmoid is recomputed there), so a frozen MLP keeps
    one ``(B, T, 4D)`` tensor per layer instead of three, and the backward is 6 in-place passes
    instead of autograd's 8 (bench/README.md)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        for xc, oc in _chunks(x, out):
            torch.mul(xc, 1.702, out=oc).sigmoid_().mul_(xc)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        # one scratch chunk for the sigmoid: a fresh 1 MiB temporary per chunk is page-faulted
        # each time (glibc maps allocations of that size), 2x slower than reusing one
        scratch = x.new_empty(min(_CHUNK, x.numel()))
        for xc, gc, oc in _chunks(x, grad, out):
            s = torch.mul(xc, 1.702, out=scratch[: xc.numel()]).sigmoid_()
            # d/dx x s(1.702 x) = s (1 + 1.702 x (1 - s))
            torch.sub(1, s, out=oc).mul_(xc).mul_(1.702).add_(1).mul_(s).mul_(gc)
        return out


class _SquaredReLU(torch.autograd.Function):
    """``relu(x) ** 2``, and the backward ``2 relu(x) grad`` with ``relu(x)`` read back as the
    square root of the output, which the next projection keeps anyway: one ``(B, T, 4D)``
    tensor per layer where keeping ``relu(x)`` was two. ``sqrt(fl(r * r)) == r`` exactly in
    float32 and bfloat16 for ``r >= 1.1e-19`` (checked over all bfloat16 values and 2e8 random
    float32 ones; below, ``r * r`` underflows and a gradient under 2.2e-19 is that of the rounded
    square). float16's squares underflow from ``r < 7.7e-3``, so float16 keeps ``relu(x)``.
    The output is saved: changing it in place before the backward is an autograd error."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = torch.relu(x)
        if x.dtype == torch.float16:
            ctx.save_for_backward(r)
            return r * r
        out = r.square_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (saved,) = ctx.saved_tensors  # relu(x) in float16, else its square
        r = saved if saved.dtype == torch.float16 else torch.sqrt(saved)
        return (grad * r).mul_(2)


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)``."""
    return _QuickGELU.apply(x)


def squared_relu(x: Tensor) -> Tensor:
    """``relu(x) ** 2``."""
    return _SquaredReLU.apply(x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "squared_relu": squared_relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; available: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# oneDNN's inner-product kernel (x86 and arm64 builds of torch have it)
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


# id(weight) -> (weight, its version when cast, the cast copy); see cast_weights_once
_CASTS: ContextVar[dict[int, tuple[Tensor, int, Tensor]] | None] = ContextVar(
    "prismkit_weight_casts", default=None
)


@contextlib.contextmanager
def cast_weights_once(store: dict | None = None) -> Iterator[dict]:
    """Within it, :func:`linear` under CPU/GPU autocast casts each float32 weight and bias to the
    autocast dtype once and reuses the copy, where autocast itself casts a frozen weight on every
    call (its cache keeps only leaf tensors that require grad). The same values (autocast's
    cast), so the same results; for loops that reuse weights without autograd, like cached
    decoding, where the per-step casts cost more than the products (bench/README.md). Pass the
    same ``store`` to reuse copies across entries; a weight changed in place is cast again.
    Yields the store; its copies live as long as it does."""
    store = {} if store is None else store
    token = _CASTS.set(store)
    try:
        yield store
    finally:
        _CASTS.reset(token)


def _cast_once(t: Tensor, dtype: torch.dtype, store: dict) -> Tensor:
    hit = store.get(id(t))
    if hit is not None and hit[0] is t and hit[1] == t._version:
        return hit[2]
    cast = t.to(dtype)
    store[id(t)] = (t, t._version, cast)
    return cast


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, computed by a faster kernel for a handful of rows without autograd.

    Decoding feeds 12 rows (4 images x 3 beams) through every layer per step and is bound by
    reading the weights. MKL's GEMM behind ``F.linear`` reads the weight once per 3 rows at such
    sizes (the tied 50265 x 768 LM head from memory: 6.5 ms for 1-3 rows, 29 ms for 10-12).
    oneDNN's inner product reads it once: 12.8 ms at 12 rows, and a 3072 x 768 layer 1.3x
    faster (bench/README.md); it serves float32 from 4 rows. Otherwise, from 8 rows:
    ``(weight @ x^T)^T``, which MKL computes 1.5x faster than ``x @ weight^T`` at 12 rows. Same
    products, summed in another order (float32 rounding). Inside :func:`cast_weights_once`,
    an autocast weight is cast once."""
    # (meta tensors have no autocast state to ask about)
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    store = _CASTS.get()
    if (
        autocast
        and store is not None
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    ):
        dtype = torch.get_autocast_dtype(x.device.type)
        weight = _cast_once(weight, dtype, store)
        bias = None if bias is None else _cast_once(bias, dtype, store)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        torch.is_grad_enabled()
        or not 4 <= rows <= 64
        or x.device.type != "cpu"
        or weight.dtype != x.dtype
    ):
        return F.linear(x, weight, bias)
    # oneDNN's op is not an autocast op: under autocast it would multiply in float32
    if _ONEDNN_LINEAR and x.dtype == torch.float32 and weight.is_contiguous() and not autocast:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if rows < 8:  # MKL's x @ W^T is the faster of the two below 8 rows
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if bias is None:
        out = torch.mm(weight, flat.t())
    else:
        out = torch.addmm(bias[:, None].to(x.dtype), weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward is :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (CLIP and Prismer do this, so
    mixed-precision training normalises in full precision); returns the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout: float = 0.0
) -> Tensor:
    """``softmax(q k^T / sqrt(Dh) + mask) v`` with dropout on the probabilities, as BERT/RoBERTa
    write it: ``q (B, H, Tq, Dh)``, ``k, v (B, H, Tk, Dh)``, ``mask`` additive float or bool
    (True = allowed) broadcastable to ``(B, H, Tq, Tk)``.

    Used instead of ``F.scaled_dot_product_attention`` where the fused CPU kernel is slower:
    with dropout (SDPA falls back to its math path, which also scales and copies the keys) and,
    when training, few queries over many keys (the resampler's 64 latents over 1,240 tokens:
    1.3x faster forward + backward here, bench/README.md), and for any bfloat16/float16 training
    on the CPU, whose fused backward is 7-10x slower than these products (bench/README.md)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    # half-precision scores: softmax in float32 (as the fused kernels accumulate)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout > 0:
        probs = F.dropout(probs, dropout, training=True)
    return torch.matmul(probs, v)


def _explicit_backward(q: Tensor, k: Tensor) -> bool:
    """Whether training attention is faster as explicit products than as the fused kernel."""
    half = q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu"
    return half or k.shape[2] >= 4 * q.shape[2]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (CLIP, BERT and RoBERTa checkpoints;
    packed ``in_proj`` weights are split when converted).

    ``forward(x (B, Tq, D), kv (B, Tk, Dkv) | None, mask, past, fixed_kv)``: ``mask`` is additive
    ``(B, 1|H, Tq, Tk)`` float (0 where allowed, a large negative number elsewhere) or bool
    (True = allowed); ``past`` holds earlier keys/values ``(B, H, Tp, Dh)`` for cached decoding,
    ``fixed_kv`` cross-attention keys/values computed once.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        kv_width: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kv_width = kv_width or width
        self.heads = heads
        self.dropout = dropout
        self.q_proj = Linear(width, width, bias=bias)
        self.k_proj = Linear(kv_width, width, bias=bias)
        self.v_proj = Linear(kv_width, width, bias=bias)
        self.out_proj = Linear(width, width, bias=bias)

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k_proj(kv)), self.split(self.v_proj(kv))

    def attend(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        fixed_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The attention output before ``out_proj`` ``(B, Tq, D)`` and the keys/values used.

        ``fixed_kv`` may hold fewer rows than ``x`` when each of its rows serves ``g`` consecutive
        rows of ``x`` (the beams of one image): ``(B / g, H, Tk, Dh)``; a mask then hides keys
        only, one row per key/value row: ``(B / g, 1, 1, Tk)``."""
        q = self.split(self.q_proj(x))
        if fixed_kv is not None:
            k, v = fixed_kv
        else:
            k, v = self.project_kv(x if kv is None else kv)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
        if mask is not None and mask.dtype.is_floating_point and mask.dtype != q.dtype:
            # keep "hidden" finite in the compute dtype (a float32 minimum is -inf in bfloat16)
            mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        b, h, t, d = q.shape
        groups = b // k.shape[0]
        if groups > 1:  # shared keys/values: the g rows' queries become one row's g*t queries
            key_mask_only = mask is None or (mask.shape[0] == k.shape[0] and mask.shape[-2] == 1)
            if not key_mask_only or b % k.shape[0]:
                raise ValueError(
                    f"keys/values of {k.shape[0]} rows cannot serve {b} query rows"
                    + ("" if mask is None else f" with a mask of shape {tuple(mask.shape)}")
                )
            q = q.view(k.shape[0], groups, h, t, d).transpose(1, 2).reshape(-1, h, groups * t, d)
        p = self.dropout if self.training else 0.0
        if p > 0 or (torch.is_grad_enabled() and _explicit_backward(q, k)):
            # heads-major keys/values: the products below then need no copy, and a decoding
            # cache keeps them so (one copy per projection instead of one per step)
            k, v = k.contiguous(), v.contiguous()
            out = explicit_attention(q, k, v, mask, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if groups > 1:
            out = out.view(-1, h, groups, t, d).transpose(1, 2).reshape(b, h, t, d)
        return out.transpose(1, 2).reshape(b, t, h * d), (k, v)

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        fixed_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, kv_used = self.attend(x, kv, mask, past, fixed_kv)
        return self.out_proj(out), kv_used


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, width: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """CLIP's pre-LN block with Prismer's adaptor between attention and MLP:
    ``x + attn(ln_1(x))`` -> ``adaptor`` -> ``x + mlp(ln_2(x))``."""

    def __init__(
        self, width: int, heads: int, mlp_hidden: int, act: str, eps: float, adaptor: nn.Module
    ) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm32(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.adaptor = adaptor
        self.layer_norm2 = LayerNorm32(width, eps=eps)
        self.mlp = Mlp(width, mlp_hidden, act)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x (B, T, D)``; ``mask (B, 1, 1, T)`` bool hides padding keys (None: all visible)."""
        x = x + self.self_attn(self.layer_norm1(x), mask=mask)[0]
        x = self.adaptor(x)
        return x + self.mlp(self.layer_norm2(x))
