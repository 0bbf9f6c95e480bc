"""The speed-ups compute what the plain formulas compute (bench/README.md says what each buys)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prismkit.core.language.decoder import DecoderCache
from prismkit.core.layers import (
    Attention,
    explicit_attention,
    linear,
    quick_gelu,
    squared_relu,
)
from prismkit.core.vision.expert_stem import ExpertStem, bilinear_taps, resize_labels_bilinear


def test_activations_forward_exactly_and_gradcheck():
    x = torch.randn(3, 7, 11)
    assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert torch.equal(squared_relu(x), torch.relu(x).square())
    x64 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(quick_gelu, (x64,))
    assert torch.autograd.gradcheck(squared_relu, (x64,))
    with torch.no_grad():  # no graph, no saved tensors
        assert quick_gelu(x).grad_fn is None
    # the squared ReLU's backward reads relu(x) back from its output: the same gradient, bitwise
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xs = (torch.randn(4096) * 10).to(dtype).requires_grad_()
        g = torch.randn(4096).to(dtype)
        (got,) = torch.autograd.grad(squared_relu(xs), xs, g)
        assert torch.equal(got, (g * torch.relu(xs.detach())).mul_(2)), dtype


def test_quick_gelu_chunks_are_the_plain_formula():
    # more than two cache-sized chunks, and a non-contiguous input (the same float operations per
    # element; the vectorised and the scalar sigmoid may differ in the last bit, and which
    # elements take the scalar tail depends on the layout)
    x = torch.randn(3, 2 * 1024 + 1, 257).transpose(0, 1)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=1e-6, atol=1e-7)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    quick_gelu(x).backward(grad)
    s = torch.sigmoid(1.702 * x.detach())
    expected = torch.sub(1, s).mul_(x.detach()).mul_(1.702).add_(1).mul_(s).mul_(grad)
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_explicit_attention_is_sdpa(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 9, 9))
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(2, 1, 5, 9, generator=g) > 0.3
        allowed[..., 0] = True
        mask = (
            allowed
            if mask_kind == "bool"
            else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        )
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(explicit_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_attention_paths_agree_in_training():
    """Few queries over many keys with autograd (the resampler) takes the explicit path: same
    outputs and gradients as SDPA."""
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 3, 16, requires_grad=True)
    kv = torch.randn(2, 20, 16, requires_grad=True)
    out = attn(x, kv)[0]
    q = attn.split(attn.q_proj(x))
    k, v = attn.project_kv(kv)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 3, 16)
    want = attn.out_proj(o)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(out.sum(), (x, kv))
    g2 = torch.autograd.grad(want.sum(), (x, kv))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_training_attention_is_explicit_and_matches_float32():
    """bf16 training on the CPU takes the explicit products (the fused kernel's backward is
    7-10x slower there): outputs and gradients within bf16 rounding of the float32 SDPA."""
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(3, 7, 32, requires_grad=True)
    mask = torch.zeros(3, 1, 7, 7).masked_fill(torch.ones(7, 7).triu(1).bool(), -1e9)
    want = attn(x, mask=mask)[0]
    g_want = torch.autograd.grad(want.square().sum(), x)[0]
    calls = []
    real = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, mask=mask)[0]
        g = torch.autograd.grad(out.float().square().sum(), x)[0]
    finally:
        F.scaled_dot_product_attention = real
    assert not calls and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.03)
    torch.testing.assert_close(g, g_want, rtol=0.05, atol=0.05)


def test_shared_keys_values_serve_groups_of_rows():
    """Keys/values of B rows serving B*g query rows equal the keys/values repeated per row."""
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    vision = torch.randn(2, 7, 16)
    x = torch.randn(6, 1, 16)  # 2 images x 3 beams
    with torch.no_grad():
        shared, kv = attn(x, vision)
        repeated, kv_rep = attn(x, vision.repeat_interleave(3, 0))
        cached, _ = attn(x, fixed_kv=kv)
    assert kv[0].shape[0] == 2 and kv_rep[0].shape[0] == 6
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached, repeated, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot serve"):
        attn(x, vision, mask=torch.zeros(6, 1, 1, 7))


def test_cache_select_keeps_shared_rows_or_gathers_them():
    kv = (torch.arange(2.0).view(2, 1, 1, 1), torch.arange(2.0).view(2, 1, 1, 1))
    self_kv = [(torch.arange(6.0).view(6, 1, 1, 1),) * 2]
    cache = DecoderCache(self_kv, [kv], torch.ones(6, 1), torch.ones(6))
    within = cache.select(torch.tensor([2, 2, 0, 4, 3, 5]))  # beams stay with their image
    assert within.cross_kv[0] is kv
    assert within.self_kv[0][0].flatten().tolist() == [2, 2, 0, 4, 3, 5]
    across = cache.select(torch.tensor([3, 0, 0, 1, 5, 5]))  # rows change images: gathered
    assert across.cross_kv[0][0].flatten().tolist() == [1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("onednn", [True, False])
def test_small_row_linear_matches(monkeypatch, onednn):
    from prismkit.core import layers

    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", onednn and layers._ONEDNN_LINEAR)
    torch.manual_seed(0)
    w, b = torch.randn(50, 24), torch.randn(50)
    for weight in (w, w.t().contiguous().t()):  # a non-contiguous weight takes the fallback
        for rows in (3, 4, 12, 40, 100):
            x = torch.randn(rows, 1, 24)
            with torch.no_grad():
                want = F.linear(x, weight, b)
                torch.testing.assert_close(linear(x, weight, b), want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(linear(x, weight), want - b, rtol=1e-5, atol=1e-5)
    xh, wh = torch.randn(12, 1, 24).bfloat16(), w.bfloat16()  # bfloat16: W @ x^T from 8 rows
    with torch.no_grad():
        torch.testing.assert_close(linear(xh, wh), F.linear(xh, wh), rtol=2e-2, atol=2e-2)
    x = torch.randn(12, 24, requires_grad=True)  # autograd: the plain op
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    meta = linear(torch.empty(12, 24, device="meta"), w.to("meta"))  # shapes only
    assert meta.shape == (12, 50) and meta.device.type == "meta"


@pytest.mark.parametrize(("size", "out"), [(224, 56), (224, 64), (30, 7), (8, 1)])
def test_label_grid_resize_is_bilinear_of_the_tiled_map(size, out):
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 9, (2, size, size), generator=g)
    table = torch.randn(9, 5, generator=g)
    tiled = F.embedding(index, table).permute(0, 3, 1, 2)
    want = F.interpolate(tiled, size=(out, out), mode="bilinear", align_corners=True)
    got = resize_labels_bilinear(index, table, out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    i0, i1, frac = bilinear_taps(size, out, torch.device("cpu"))
    assert (i1 - i0).le(1).all() and frac.ge(0).all() and frac.lt(1).all()


@pytest.mark.parametrize(
    ("kind", "channels", "patch"),
    [("dense", 3, 16), ("dense", 1, 14), ("semantic", 64, 16), ("semantic", 64, 14)],
)
def test_expert_stem_fast_paths_match_the_reference_recipe(kind, channels, patch):
    """Channels-last, the skipped identity resize, the label-grid resize and (eval) the BatchNorms
    folded into the convs give the reference's UpsamplingBilinear2d -> convs result, in training
    and eval mode."""
    torch.manual_seed(0)
    stem = ExpertStem(in_channels=channels, width=32, patch_size=patch, kind=kind)
    assert stem.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    for bn in stem.convs[1::3]:  # non-trivial statistics: eval mode folds them into the convs
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(bn.weight, 1.0, 0.2)
        nn.init.normal_(bn.bias)
    for mode in (True, False):
        stem.train(mode)
        if kind == "semantic":
            index = torch.randint(0, 7, (2, 224, 224))
            table = torch.randn(7, channels)
            x = F.embedding(index, table).permute(0, 3, 1, 2).contiguous()
        else:
            x = torch.rand(2, channels, 224, 224)
        state = {k: v.clone() for k, v in stem.state_dict().items()}
        want = stem.proj(stem.convs(stem.resize(x)))  # the reference's nn.Sequential order
        stem.load_state_dict(state)  # undo the running-statistics update
        got = stem.forward_labels(index, table) if kind == "semantic" else stem(x)
        assert got.shape == want.shape == (2, 32, 224 // patch, 224 // patch)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sparse_lookup_gradient_equals_dense(host):
    """The word embeddings' lookup gradient is sparse; summed with the tied head's it equals the
    dense gradient, and a loss without the head still leaves a dense gradient."""
    from prismkit.core.config import resolve_config
    from prismkit.core.model import create_model

    torch.manual_seed(0)
    model = create_model(resolve_config(host, "tiny"), host, pretrained=False).eval()  # no dropout
    lang = model.language
    w = lang.word_embeddings.weight
    ids = torch.randint(5, 100, (2, 6))
    vision = torch.randn(2, 5, model.config.vision.width)

    def loss_fn() -> torch.Tensor:
        hidden, _ = lang(ids, vision)
        return lang.logits(hidden).logsumexp(-1).sum()

    loss_fn().backward()
    sparse_grad = w.grad.clone()
    assert not w.grad.is_sparse
    w.grad = None
    orig = F.embedding

    def dense_embedding(input, weight, padding_idx=None, *args, sparse=False, **kwargs):
        return orig(input, weight, padding_idx, sparse=False)

    F.embedding = dense_embedding
    try:
        loss_fn().backward()
    finally:
        F.embedding = orig
    torch.testing.assert_close(sparse_grad, w.grad, rtol=1e-5, atol=1e-7)
    w.grad = None
    hidden, _ = lang(ids, None)  # text alone, no head: only the sparse lookup gradient
    hidden.square().sum().backward()
    assert w.grad is not None and not w.grad.is_sparse


def test_cast_weights_once_is_autocast_cast_once():
    from prismkit.core.layers import cast_weights_once

    torch.manual_seed(0)
    w, b, x = torch.randn(40, 24), torch.randn(40), torch.randn(12, 1, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w, b)  # autocast casts x, w and b to bfloat16 at every call
        plain = linear(x, w, b)  # an autocast op, not oneDNN's float32 inner product
        assert plain.dtype == torch.bfloat16
        torch.testing.assert_close(plain, want, rtol=2e-2, atol=2e-2)
        with cast_weights_once() as store:
            got = linear(x, w, b)
            again = linear(x, w, b)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(again, want)
        assert len(store) == 2 and all(c.dtype == torch.bfloat16 for _, _, c in store.values())
        cast = store[id(w)][2]
        with cast_weights_once(store):
            linear(x, w, b)
        assert store[id(w)][2] is cast  # reused across entries with the same store
        w.mul_(2)  # changed in place: cast again
        with cast_weights_once(store):
            torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
        assert store[id(w)][2] is not cast
    with torch.no_grad(), cast_weights_once() as store:  # no autocast: nothing is cast
        assert torch.equal(linear(x, w, b), F.linear(x, w, b)) and not store
    with torch.autocast("cpu", dtype=torch.bfloat16), cast_weights_once() as store:
        linear(x, w.requires_grad_(), b)  # autograd: autocast's own casts
        assert not store
