"""The tied word embeddings' gradient formed in the lookup's backward (core/language/tied.py)
equals autograd's sum of the head's dense and the lookup's sparse gradients, in every order the
decoder can be used in, and needs no second (V, D) buffer."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prismkit.core.config import resolve_config
from prismkit.core.language import tied
from prismkit.core.model import create_model


@pytest.fixture
def lang(host):
    torch.manual_seed(0)
    model = create_model(resolve_config(host, "tiny"), host, pretrained=False).eval()
    return model.language, model.config.vision.width


def _batch(lang, width):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (2, 6), generator=g)
    ids[:, :2] = 7  # repeated rows
    ids[0, 0] = lang.pad_token_id  # the padding row gets no lookup gradient
    return ids, torch.randn(2, 5, width, generator=g)


def _weight_grad(lang, width, monkeypatch, fast: bool, case: str) -> torch.Tensor:
    monkeypatch.setattr(tied, "applies", tied.applies if fast else lambda w: False)
    ids, vision = _batch(lang, width)
    w = lang.word_embeddings.weight
    w.grad = None
    if case == "one forward":
        h, _ = lang(ids, vision)
        (lang.logits(h).logsumexp(-1).sum() + h.sum()).backward()
    elif case.startswith("two forwards"):
        h1, _ = lang(ids, vision)
        h2, _ = lang(ids.flip(0), vision)
        on = h1 if case.endswith("first") else h2
        (lang.logits(on[:, 1:]).logsumexp(-1).sum() + h1.sum() + 2 * h2.sum()).backward()
    elif case == "two heads":
        h, _ = lang(ids, vision)
        (lang.logits(h).logsumexp(-1).sum() + lang.logits(h[:, -1]).max(-1).values.sum()).backward()
    elif case == "no head":
        h, _ = lang(ids, vision)
        h.square().sum().backward()
    elif case == "accumulated":
        for step in range(2):
            h, _ = lang(ids.roll(step, 1), vision)
            lang.logits(h).logsumexp(-1).sum().backward()
    monkeypatch.undo()
    return w.grad.to_dense()


@pytest.mark.parametrize(
    "case",
    [
        "one forward",
        "two forwards, head on first",
        "two forwards, head on second",
        "two heads",
        "no head",
        "accumulated",
    ],
)
def test_tied_gradient_equals_autograds_sum(lang, monkeypatch, case):
    lang, width = lang
    fast = _weight_grad(lang, width, monkeypatch, True, case)
    plain = _weight_grad(lang, width, monkeypatch, False, case)
    assert not fast.is_sparse and fast.abs().sum() > 0
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert fast[lang.pad_token_id].abs().sum() == plain[lang.pad_token_id].abs().sum()


def test_a_head_whose_lookup_never_runs_is_added_after_the_backward(lang, monkeypatch):
    """The head's hidden states come from an earlier forward and the latest forward is not part
    of the loss: the deferred product is added at the end of the backward, with a warning."""
    lang, width = lang
    ids, vision = _batch(lang, width)
    w = lang.word_embeddings.weight

    def grad(fast: bool) -> torch.Tensor:
        monkeypatch.setattr(tied, "applies", tied.applies if fast else lambda w: False)
        w.grad = None
        h1, _ = lang(ids, vision)
        lang(ids.flip(0), vision)  # a later forward, left out of the loss
        (lang.logits(h1).logsumexp(-1).sum() + h1.sum()).backward()
        monkeypatch.undo()
        return w.grad.to_dense()

    with pytest.warns(RuntimeWarning, match="after the backward"):
        fast = grad(True)
    torch.testing.assert_close(fast, grad(False), rtol=1e-5, atol=1e-6)


class _BigAdds(TorchDispatchMode):
    """Counts out-of-place additions producing a tensor of ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.add.Tensor and out.numel() == self.numel:
            self.count += 1
        return out


@pytest.mark.parametrize("fast", [True, False])
def test_no_second_dense_buffer(lang, monkeypatch, fast):
    lang, width = lang
    monkeypatch.setattr(tied, "applies", tied.applies if fast else lambda w: False)
    ids, vision = _batch(lang, width)
    w = lang.word_embeddings.weight
    w.grad = None
    h, _ = lang(ids, vision)
    loss = lang.logits(h).logsumexp(-1).sum()
    with _BigAdds(w.numel()) as adds:
        loss.backward()
    assert adds.count == (0 if fast else 1)
    assert w.grad.is_contiguous() and not w.grad.is_sparse
