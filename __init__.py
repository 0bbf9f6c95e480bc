"""prismkit: Prismer-style vision-language models on frozen backbones and pluggable experts.

``prismkit.create_model(name, pretrained=False, **overrides)`` and
``prismkit.load_checkpoint(path)`` are the one-call API; ``hookimpl`` marks a plugin's hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prismkit.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from prismkit.core.api import create_model, load_checkpoint

__version__ = "0.2.0"
__all__ = ["__version__", "create_model", "hookimpl", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    # torch-heavy parts load on first use: ``from prismkit import hookimpl`` stays light
    if name in ("create_model", "load_checkpoint"):
        from prismkit.core import api

        return getattr(api, name)
    raise AttributeError(f"module 'prismkit' has no attribute {name!r}")
