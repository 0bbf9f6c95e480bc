"""Prismer's residual adaptor: a bottleneck MLP with squared ReLU, pre-norm in the vision
transformer (``x + up(act(down(LN(x))))``) and post-norm in the language model
(``LN(x + up(act(down(x))))``), as the reference places them."""

from __future__ import annotations

from torch import Tensor, nn

from prismkit.core.hookspecs import hookimpl
from prismkit.core.layers import LayerNorm32, activation


class ResidualAdaptor(nn.Module):
    """``(B, T, D) -> (B, T, D)``.

    Args:
        width: model width D.
        hidden: bottleneck width (Prismer: D, ratio 1).
        act: activation between the projections (Prismer: squared ReLU).
        post_norm: ``LN(x + f(x))`` (Prismer's language adaptor) instead of ``x + f(LN(x))``.
        zero_init: start the up-projection at zero (not the reference; an option): a pre-norm
            adaptor is then the identity until training moves it.
        eps: LayerNorm epsilon.
    """

    name = "residual"

    def __init__(
        self,
        *,
        width: int,
        hidden: int,
        act: str = "squared_relu",
        post_norm: bool = False,
        zero_init: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm = LayerNorm32(width, eps=eps)
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        self.act = activation(act)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.post_norm:
            return self.norm(x + self.up(self.act(self.down(x))))
        return x + self.up(self.act(self.down(self.norm(x))))


@hookimpl
def register_adaptors(register) -> None:
    register(ResidualAdaptor)
