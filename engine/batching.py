"""Which samples make each batch, and the decoded images they need."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterator

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


def image_key(data: VLDataset, i: int) -> Hashable:
    """What identifies sample ``i``'s image: its file path (shared by every question about it),
    or the sample's index for an image given as a tensor."""
    image = data[i].image
    return image if isinstance(image, str) else ("index", i)


class ImageCache:
    """Decoded images of a dataset at the model's size, cached (small sets) per image: the
    questions about one image share one entry."""

    def __init__(self, data: VLDataset, size: int) -> None:
        self.data, self.size, self.cache = data, size, {}

    def __call__(self, i: int) -> torch.Tensor:
        key = image_key(self.data, i)
        if key not in self.cache:
            img = self.data.image(i)
            self.cache[key] = F.interpolate(
                img[None], size=(self.size, self.size), mode="bicubic", antialias=True
            )[0].clamp(0, 1)
        return self.cache[key]


class FeatureCache:
    """The frozen image stem's output per image (``train.cache_frozen_features``): computed the
    first time an image is seen, then reused at every later epoch. Valid only while the images
    are the same tensors every time (no augmentation) and the stem's trunk stays frozen. Holds
    at most ``max_mib`` MiB; images beyond that are recomputed each time."""

    def __init__(self, max_mib: float) -> None:
        self.max_bytes = int(max_mib * 2**20)
        self.store: dict[Hashable, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __call__(self, model, keys: list[Hashable], pixels: torch.Tensor) -> torch.Tensor | None:
        """``(B, C, g, g)`` stem features of ``pixels (B, 3, S, S)`` (whose images are
        ``keys``), or None when the model's stem has no frozen part."""
        todo = [j for j, k in enumerate(keys) if k not in self.store]
        fresh: dict[Hashable, torch.Tensor] = {}
        if todo:
            feats = model.stem_features(pixels[todo])
            if feats is None:
                return None
            for j, f in zip(todo, feats, strict=True):
                f = f.clone()  # no view of the batch's buffer: only this row is kept
                fresh[keys[j]] = f
                size = f.numel() * f.element_size()
                if keys[j] not in self.store and self.bytes + size <= self.max_bytes:
                    self.store[keys[j]] = f
                    self.bytes += size
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([self.store.get(k, fresh.get(k)) for k in keys])


def iter_batches(data: VLDataset, batch_size: int, limit: int | None = None) -> Iterator[list[int]]:
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        yield list(range(start, min(n, start + batch_size)))
