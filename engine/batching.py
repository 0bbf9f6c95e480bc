"""Which samples make each batch, and the decoded images they need."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from prismkit.core.data import VLDataset


def batch_indices(
    step: int,
    micro: int,
    rank: int,
    world: int,
    cfg,
    n: int,
    per: int | None = None,
    stream: int = 0,
) -> list[int]:
    """Dataset indices of one micro-batch: a pure function of (step, micro-batch, rank), so a
    resumed run reads exactly what the interrupted one would have. Epochs are seeded permutations.
    ``per``: samples drawn (default ``cfg.batch_size``); ``stream``: a second dataset read beside
    the first (text-only mixing) gets its own permutations."""
    per = cfg.batch_size if per is None else per
    start = ((step * cfg.grad_accum + micro) * world + rank) * per
    out = []
    for pos in range(start, start + per):
        epoch, i = divmod(pos, n)
        out.append(int(_epoch_order(cfg.seed, epoch, n, stream)[i]))
    return out


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int, stream: int = 0) -> np.ndarray:
    key = seed * 1_000_003 + epoch if stream == 0 else [seed, epoch, stream]
    return np.random.default_rng(key).permutation(n)


class ImageCache:
    """Decoded images of a dataset at the model's size, cached (small sets) by index."""

    def __init__(self, data: VLDataset, size: int) -> None:
        self.data, self.size, self.cache = data, size, {}

    def __call__(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            img = self.data.image(i)
            self.cache[i] = F.interpolate(
                img[None], size=(self.size, self.size), mode="bicubic", antialias=True
            )[0].clamp(0, 1)
        return self.cache[i]


def iter_batches(data: VLDataset, batch_size: int, limit: int | None = None) -> Iterator[list[int]]:
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        yield list(range(start, min(n, start + batch_size)))
