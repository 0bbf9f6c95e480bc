"""Prismer's residual adaptor: ``x + Linear(act(Linear(LN(x))))``, identity at initialisation."""

from __future__ import annotations

from torch import Tensor, nn

from prismkit.core.hookspecs import hookimpl
from prismkit.core.layers import activation


class ResidualAdaptor(nn.Module):
    """``(B, T, D) -> (B, T, D)``. The up-projection starts at zero, so inserting the adaptor
    leaves a frozen backbone's output unchanged until training moves it."""

    name = "residual"

    def __init__(self, *, width: int, hidden: int, act: str = "squared_relu") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        self.act = activation(act)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(self.norm(x))))


@hookimpl
def register_adaptors(register) -> None:
    register(ResidualAdaptor)
