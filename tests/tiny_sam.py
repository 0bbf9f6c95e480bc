"""A tiny random SAM checkpoint for the tests, saved as SAM's official files are saved."""

from __future__ import annotations

from pathlib import Path

import torch

from prismkit.experts.sam import TINY_SAM_ARCH, build_sam

TINY_SAM = TINY_SAM_ARCH


def save_tiny_sam(path: Path, seed: int = 0) -> Path:
    """Save a random ``TINY_SAM``'s state dict with ``torch.save`` (a plain state dict, as
    SAM's official ``.pth`` files are); ~0.4 MB."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_sam(TINY_SAM).state_dict(), path)
    return path
