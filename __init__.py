"""prismkit: Prismer-style vision-language models on frozen backbones and pluggable experts."""

from prismkit.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
