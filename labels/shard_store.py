"""Expert labels for webdataset shards: one safetensors file per (shard, expert), streamed with
the images.

Layout under ``root``::

    root/<expert name>/v<expert version>/<size tag>/<shard id>.safetensors

``shard id`` is :func:`prismkit.core.shards.shard_id` (the shard's folder and stem,
``cc3m/000012.tar`` -> ``cc3m_000012``); ``size tag`` is ``native`` or ``<S>px`` as in the
per-image :class:`~prismkit.labels.store.LabelStore`. A file holds one tensor per sample key
(the sample's labels, batch dimension dropped, encoded as the per-image store encodes them:
dense float16, semantic uint16 indices) and JSON metadata (format, expert, version, kind, size,
the shard's URL, every key's label names and the sha256 of every tensor's bytes). 66 million
label files for Prismer's 11M images and six experts become one file per shard and expert.

Files are written whole (temporary file + rename, umask mode): a shard is labelled or not, so
``prismkit experts run --shards`` resumes shard by shard, and a truncated file (its size short
of what its header declares) counts as missing and is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prismkit.core.data import DataError
from prismkit.core.expert import LabelMap
from prismkit.core.io import atomic_write
from prismkit.core.shards import shard_id
from prismkit.labels.store import ExpertLike, _safe, declared_size, decode_labels, encode_labels

FORMAT = "prismkit.shard-labels/1"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class ShardLabelStore:
    """Labels of webdataset shards, one file per (shard, expert). ``size``: ``None`` = labels
    at each image's own resolution; ``S`` = images were resized to ``S x S`` first."""

    def __init__(self, root: str | Path, size: int | None = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"label store size must be a positive number of pixels, got {size}")
        self.root, self.size = Path(root), size

    @property
    def size_tag(self) -> str:
        return "native" if self.size is None else f"{self.size}px"

    def path(self, url: str, expert: ExpertLike) -> Path:
        return (
            self.root
            / _safe(expert.name)
            / f"v{_safe(str(expert.version))}"
            / self.size_tag
            / f"{shard_id(url)}.safetensors"
        )

    def has(self, url: str, expert: ExpertLike) -> bool:
        """The whole file is there (a truncated one counts as missing)."""
        p = self.path(url, expert)
        try:
            return declared_size(p) == p.stat().st_size
        except FileNotFoundError:
            return False

    def write(self, url: str, expert: ExpertLike, labels: dict[str, LabelMap]) -> Path:
        """Store every sample's labels (key -> ``LabelMap`` of batch 1) of shard ``url`` at once."""
        return self.write_encoded(
            url, expert, {k: encode_labels(v, expert.kind) for k, v in labels.items()}
        )

    def write_encoded(
        self, url: str, expert: ExpertLike, encoded: dict[str, tuple[dict, list[str] | None]]
    ) -> Path:
        """:meth:`write` of labels already encoded (``encode_labels``: arrays and names)."""
        from safetensors.numpy import save_file

        arrays = {k: arrs["values"] for k, (arrs, _) in encoded.items()}
        meta = {
            "format": FORMAT,
            "expert": expert.name,
            "version": str(expert.version),
            "kind": expert.kind,
            "size": self.size_tag,
            "shard": url,
            "names": {k: names for k, (_, names) in encoded.items()},
            "values_sha256": {k: _sha(a) for k, a in arrays.items()},
        }
        target = self.path(url, expert)
        atomic_write(
            target,
            lambda tmp: save_file(
                arrays, tmp, metadata={"prismkit": json.dumps(meta, sort_keys=True)}
            ),
        )
        return target

    def open(self, url: str, expert: ExpertLike) -> ShardLabels:
        """The labels of shard ``url`` (read lazily, key by key)."""
        return ShardLabels(self, url, expert)

    def __repr__(self) -> str:
        return f"ShardLabelStore({str(self.root)!r}, size={self.size})"


class ShardLabels:
    """One (shard, expert) file, open: :meth:`get` reads one sample's labels and checks them."""

    def __init__(self, store: ShardLabelStore, url: str, expert: ExpertLike) -> None:
        from safetensors import safe_open

        self.url, self.expert, self.path = url, expert, store.path(url, expert)
        hint = (
            f"run `prismkit experts run --shards {url} --store {store.root} --experts "
            f"{expert.name}" + (f" --size {store.size}`" if store.size else "`")
        )
        if not store.has(url, expert):
            state = "is truncated" if self.path.exists() else "does not exist"
            raise DataError(
                f"shard {url}: no {expert.name!r} labels (version {expert.version}, "
                f"{store.size_tag}): {self.path} {state}: {hint}"
            )
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            self.meta = json.loads((self._file.metadata() or {}).get("prismkit", "{}"))
        except Exception as e:
            raise DataError(f"label file {self.path} cannot be read ({e}): {hint}") from None
        if self.meta.get("format") != FORMAT or self.meta.get("kind") != expert.kind:
            raise DataError(
                f"label file {self.path} is not {expert.kind!r} shard labels of format {FORMAT}: {hint}"
            )
        self.hint = hint

    def get(self, key: str) -> LabelMap:
        """Sample ``key``'s labels: dense ``(1, C, H, W)`` float32 or semantic ``(1, H, W)``
        int64 + names. ``DataError`` naming shard, key and expert when missing or damaged."""
        if key not in self.meta.get("values_sha256", {}):
            raise DataError(
                f"shard {self.url}: sample {key} has no {self.expert.name!r} labels in "
                f"{self.path}: {self.hint}"
            )
        values = self._file.get_tensor(key)
        if _sha(values) != self.meta["values_sha256"][key]:
            raise DataError(
                f"label file {self.path}: sample {key} is damaged (checksum mismatch): delete the "
                f"file and {self.hint}"
            )
        return decode_labels({"values": values}, self.meta["names"][key])


class StreamLabels:
    """Labels of streamed batches for the loader workers: the files of the shard being read
    stay open; ``batch`` stacks one expert map per sample at the training size."""

    def __init__(
        self, root: str | Path, experts: Sequence[ExpertLike], size: int | None = None
    ) -> None:
        self.root, self.size = Path(root), size
        self.experts = list(experts)
        self._open: dict[tuple[str, str], ShardLabels] = {}
        self._stores: dict[str, ShardLabelStore] = {}

    def store_for(self, expert: ExpertLike, image_size: int) -> ShardLabelStore:
        """The store of ``expert``'s labels: at ``size`` if given, else the one size the root
        holds for its version (``native`` or ``<S>px``; with several, ``<image_size>px``, then
        ``native``)."""
        if expert.name not in self._stores:
            size = self.size
            if size is None:
                folder = self.root / _safe(expert.name) / f"v{_safe(str(expert.version))}"
                tags = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
                if len(tags) > 1:
                    tags = [t for t in (f"{image_size}px", "native") if t in tags][:1] or tags
                    if len(tags) > 1:
                        raise DataError(
                            f"label store {self.root}: {expert.name!r} labels at sizes {tags}: "
                            f"label at the training size (--size {image_size}) or keep one"
                        )
                if tags and tags[0].endswith("px"):
                    size = int(tags[0][:-2])
            self._stores[expert.name] = ShardLabelStore(self.root, size)
        return self._stores[expert.name]

    def batch(self, raws: list[dict[str, Any]], image_size: int) -> dict[str, LabelMap]:
        """Expert name -> ``LabelMap`` of the batch (dense ``(B, C, S, S)``, semantic
        ``(B, S, S)`` + names), resized (nearest) to ``image_size``."""
        out = {}
        for e in self.experts:
            maps = []
            for raw in raws:
                url = raw["__url__"]
                if (url, e.name) not in self._open:
                    self._open = {k: v for k, v in self._open.items() if k[0] == url}
                    self._open[(url, e.name)] = self.store_for(e, image_size).open(url, e)
                maps.append(self._open[(url, e.name)].get(raw["__key__"]))
            values = []
            for m in maps:
                v = m.values if e.kind == "dense" else m.values[:, None].float()
                if tuple(v.shape[-2:]) != (image_size, image_size):
                    v = F.interpolate(v, size=(image_size, image_size), mode="nearest")
                values.append(v if e.kind == "dense" else v[:, 0].long())
            names = None if e.kind == "dense" else [m.names[0] for m in maps]  # type: ignore[index]
            out[e.name] = LabelMap(torch.cat(values), names)
        return out

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to workers
        return {**self.__dict__, "_open": {}}
