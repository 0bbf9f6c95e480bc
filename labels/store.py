"""The label store: expert outputs precomputed once per (image content, expert, version).

Layout under ``root``::

    root/<expert name>/v<expert version>/<size tag>/<sha256[:2]>/<sha256>.safetensors

``sha256`` is the hash of the image file's bytes, so renaming or moving an image reuses its
labels, editing it recomputes them, and bumping an expert's ``version`` recomputes that expert
only. ``size tag`` is ``native`` (labels at the image's own resolution, the default) or ``<S>px``
when images were resized to ``S x S`` before labelling (``LabelStore(root, size=S)``).

Each file holds one image's labels (batch dimension dropped), lossless against what the
reference stores (8-bit PNGs):

- dense maps: ``values`` ``(C, H, W)`` float16 (relative error <= 2**-11, no per-image min-max
  quantisation); a map with values beyond float16's range (|x| > 65504) is kept as float32.
- semantic maps: ``values`` ``(H, W)`` uint16 indices (at most 65,536 labels per image) and their
  names list in the metadata.

Metadata is one JSON string under the key ``prismkit`` (expert, version, kind, size, sha256,
names, and ``values_sha256``: the sha256 of the stored array's bytes). Files are written
atomically (temporary file + ``os.replace``): a killed run leaves either a whole file or none,
and perhaps a ``.*.tmp`` file, which the next ``prismkit experts run`` deletes once its writer is
gone. A file damaged later is caught three ways: ``has`` compares its size with what its header
declares (a truncated file counts as missing, so a rerun recomputes it), ``get`` checks the
checksum, and ``prismkit experts run --verify`` checks every file's checksum and recomputes the
damaged ones. Files are created with the mode the umask gives (shared stores work).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.io import atomic_write

FORMAT = "prismkit.labels/1"
FLOAT16_MAX = float(np.finfo(np.float16).max)

ExpertLike = type[Expert] | Expert


class MissingLabelsError(FileNotFoundError):
    """The store has no labels of this expert (and version) for this image."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe(part: str) -> str:
    """A path component from an expert name or version (anything but ``[A-Za-z0-9._-]`` -> ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", part)
    if cleaned in ("", ".", ".."):
        raise ValueError(f"{part!r} cannot name a label-store folder")
    return cleaned


def encode_labels(out: LabelMap, kind: str) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """One image's labels (batch of 1) -> the arrays stored and the names (semantic only)."""
    v = out.values
    if v.shape[0] != 1:
        raise ValueError(f"encode_labels takes one image's labels; got batch {v.shape[0]}")
    if kind == "dense":
        arr = v[0].detach().float().cpu().numpy()
        finite = arr[np.isfinite(arr)]
        small = finite.size == 0 or float(np.abs(finite).max()) <= FLOAT16_MAX
        return {"values": arr.astype(np.float16 if small else np.float32)}, None
    if out.names is None:
        raise ValueError("a semantic label map needs names")
    idx = v[0].detach().cpu().numpy()
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) > np.iinfo(np.uint16).max):
        raise ValueError(
            f"semantic indices span [{int(idx.min())}, {int(idx.max())}]; the store keeps uint16 (0..65535)"
        )
    return {"values": idx.astype(np.uint16)}, list(out.names[0])


def _values_sha256(arrays: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(np.ascontiguousarray(arrays["values"]).tobytes()).hexdigest()


def declared_size(path: str | Path) -> int | None:
    """The size a safetensors file's header says it has (8 + header + data), or ``None`` when
    the header itself cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def decode_labels(arrays: dict[str, np.ndarray], names: list[str] | None) -> LabelMap:
    """Stored arrays -> a ``LabelMap`` of batch 1: dense ``(1, C, H, W)`` float32, semantic
    ``(1, H, W)`` int64 + ``[names]``."""
    values = arrays["values"]
    if names is None:
        return LabelMap(torch.from_numpy(values.astype(np.float32))[None])
    return LabelMap(torch.from_numpy(values.astype(np.int64))[None], [list(names)])


def roundtrip(out: LabelMap, kind: str) -> LabelMap:
    """What ``get`` would return after ``put``: dependents read exactly the stored labels."""
    return decode_labels(*encode_labels(out, kind))


class LabelStore:
    """Precomputed labels on disk. ``size``: ``None`` = labels at each image's own resolution;
    ``S`` = images were resized to ``S x S`` first (a separate set of files)."""

    def __init__(self, root: str | Path, size: int | None = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"label store size must be a positive number of pixels, got {size}")
        self.root = Path(root)
        self.size = size
        self._hashes: dict[tuple[str, int, int], str] = {}

    @property
    def size_tag(self) -> str:
        return "native" if self.size is None else f"{self.size}px"

    def image_key(self, image_path: str | Path) -> str:
        """sha256 of the image file (cached per path, size and mtime)."""
        p = Path(image_path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"image {p} does not exist") from None
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(p)
        return self._hashes[key]

    def path_for(self, sha256: str, expert: ExpertLike) -> Path:
        """Where the labels of ``expert`` for the image with hash ``sha256`` live."""
        return (
            self.root
            / _safe(expert.name)
            / f"v{_safe(str(expert.version))}"
            / self.size_tag
            / sha256[:2]
            / f"{sha256}.safetensors"
        )

    def path(self, image_path: str | Path, expert: ExpertLike) -> Path:
        return self.path_for(self.image_key(image_path), expert)

    def has(self, image_path: str | Path, expert: ExpertLike) -> bool:
        return self.path(image_path, expert).is_file()

    def has_key(self, sha256: str, expert: ExpertLike) -> bool:
        """A whole label file is there: it exists and has the size its header declares (a
        truncated file counts as missing)."""
        target = self.path_for(sha256, expert)
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            return False
        return declared_size(target) == size

    def verify_key(self, sha256: str, expert: ExpertLike) -> str | None:
        """What is wrong with the stored label file (missing, truncated, unreadable, checksum
        mismatch), or ``None`` when it is whole."""
        if not self.path_for(sha256, expert).is_file():
            return "missing"
        if not self.has_key(sha256, expert):
            return "truncated (smaller than its header declares)"
        try:
            self.get_key(sha256, expert)
        except (ValueError, MissingLabelsError) as e:
            return str(e)
        return None

    def put(self, image_path: str | Path, expert: ExpertLike, labels: LabelMap) -> Path:
        """Store one image's labels (``LabelMap`` of batch 1) atomically; returns the file."""
        return self.put_key(self.image_key(image_path), expert, labels)

    def put_key(self, sha256: str, expert: ExpertLike, labels: LabelMap) -> Path:
        from safetensors.numpy import save_file

        arrays, names = encode_labels(labels, expert.kind)
        meta = {
            "format": FORMAT,
            "expert": expert.name,
            "version": str(expert.version),
            "kind": expert.kind,
            "size": self.size_tag,
            "sha256": sha256,
            "names": names,
            "values_sha256": _values_sha256(arrays),
        }
        target = self.path_for(sha256, expert)
        atomic_write(
            target,
            lambda tmp: save_file(
                arrays, tmp, metadata={"prismkit": json.dumps(meta, sort_keys=True)}
            ),
        )
        return target

    def get(self, image_path: str | Path, expert: ExpertLike) -> LabelMap:
        """The stored labels of ``expert`` for ``image_path``: dense ``(1, C, H, W)`` float32 or
        semantic ``(1, H, W)`` int64 + names. Raises ``MissingLabelsError`` (never zeros)."""
        sha = self.image_key(image_path)
        try:
            return self.get_key(sha, expert)
        except MissingLabelsError:
            raise MissingLabelsError(self._missing_message(image_path, sha, expert)) from None

    def get_key(self, sha256: str, expert: ExpertLike) -> LabelMap:
        from safetensors import safe_open

        target = self.path_for(sha256, expert)
        if not target.is_file():
            raise MissingLabelsError(
                f"no {expert.name!r} labels (version {expert.version}, {self.size_tag}) for image "
                f"sha256 {sha256} in {self.root}"
            )
        try:
            with safe_open(str(target), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("prismkit", "{}"))
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        except Exception as e:
            raise ValueError(
                f"label file {target} ({expert.name!r}) cannot be read ({e}): delete it and rerun "
                f"`prismkit experts run`"
            ) from None
        if meta.get("format") != FORMAT or meta.get("kind") != expert.kind:
            raise ValueError(
                f"label file {target} holds {meta.get('kind')!r} labels of format "
                f"{meta.get('format')!r}; expert {expert.name!r} is {expert.kind!r}: delete it and rerun"
            )
        want = meta.get("values_sha256")
        if want is not None and ("values" not in arrays or _values_sha256(arrays) != want):
            raise ValueError(
                f"label file {target} ({expert.name!r}) is damaged (checksum mismatch): rerun "
                f"`prismkit experts run IMAGES --store {self.root} --verify` to recompute it"
            )
        return decode_labels(arrays, meta.get("names"))

    def get_batch(
        self,
        image_paths: Sequence[str | Path],
        expert: ExpertLike,
        size: tuple[int, int] | None = None,
    ) -> LabelMap:
        """Labels of several images stacked: dense ``(B, C, H, W)`` float32 or semantic
        ``(B, H, W)`` int64 + names. ``size=(H, W)`` resizes every map to it (nearest, as the
        reference resizes label maps); without it the stored maps must share one size."""
        maps = [self.get(p, expert) for p in image_paths]
        if not maps:
            raise ValueError(f"get_batch({expert.name!r}) got no images")
        if size is not None:
            size = (int(size[0]), int(size[1]))
            for m in maps:
                if tuple(m.values.shape[-2:]) != size:
                    v = m.values if expert.kind == "dense" else m.values[:, None].float()
                    v = F.interpolate(v, size=size, mode="nearest")
                    m.values = v if expert.kind == "dense" else v[:, 0].long()
        shapes = {tuple(m.values.shape[1:]) for m in maps}
        if len(shapes) > 1:
            raise ValueError(
                f"{expert.name!r} labels of these images have different sizes {sorted(shapes)}: "
                f"pass size=(H, W) or use a store with a fixed size (prismkit experts run --size S)"
            )
        values = torch.cat([m.values for m in maps])
        names = None if expert.kind == "dense" else [m.names[0] for m in maps]  # type: ignore[index]
        return LabelMap(values, names)

    def _missing_message(self, image_path: str | Path, sha: str, expert: ExpertLike) -> str:
        folder = self.root / _safe(expert.name)
        others = sorted(
            f"{v.name}/{s.name}"
            for v in (folder.iterdir() if folder.is_dir() else ())
            for s in (v.iterdir() if v.is_dir() else ())
            if (s / sha[:2] / f"{sha}.safetensors").is_file()
        )
        found = f"; found only {', '.join(others)}" if others else ""
        size = "" if self.size is None else f" --size {self.size}"
        return (
            f"no labels of expert {expert.name!r} (version {expert.version}, {self.size_tag}) for "
            f"image {image_path} (sha256 {sha[:12]}) in label store {self.root}{found}: run "
            f"`prismkit experts run {image_path} --store {self.root} --experts {expert.name}{size}`"
        )

    def __repr__(self) -> str:
        return f"LabelStore({str(self.root)!r}, size={self.size})"
