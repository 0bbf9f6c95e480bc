"""Prismer's own label space: the reference's label-feature tables and its PCA, read safely.

The reference (NVlabs/prismer) tiles semantic maps with 64-d features: rows of its shipped tables
(``dataset/coco_features.pt`` for COCO-panoptic classes, ``ade_features.pt``,
``detection_features.pt`` for its detector's 722 classes; each ``{"labels": [...], "features":
(K, 64)}``), a fixed non-zero ``background_features.pt`` vector, and, for free text (OCR words),
CLIP ViT-L/14's projected text features (not normalised) reduced by its fitted PCA
(``clip_pca.pkl``: ``(x - mean_) @ components_.T``, no whitening).

``prismkit convert prismer-labels DIR --out FILE`` converts those files once into one safetensors
file: the tables are read with ``torch.load(weights_only=True)`` (tensors and lists of strings
only); the PCA pickle is never unpickled as such: :func:`read_pca_pickle` parses it with an
allow-list (numpy arrays and scalars, and sklearn's ``PCA`` replaced by a plain attribute
holder; any other object is refused), the same guarantee ``weights_only`` gives. The converted
file is what :class:`PrismerLabelSpace` reads.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prismkit.core.io import atomic_write
from prismkit.labels.embedding import ADE20K, BACKGROUND, COCO_PANOPTIC, TextEncoder, clean_label

FORMAT = "prismkit.prismer_label_space/1"
TABLES = ("coco", "ade", "detection")
# the class names prismkit's experts use for the tables' rows (same order: detectron2's COCO
# panoptic classes, ADE20K's 150): the reference's tables name some rows differently
# ("other type of wall" for "wall-other-merged")
STANDARD_NAMES = {"coco": COCO_PANOPTIC, "ade": ADE20K}
# the text encoder of the reference's free-text features (CLIP ViT-L/14, projected)
CLIP_L14 = "openai/clip-vit-large-patch14"


class _Attributes:
    """What an allow-listed pickled object becomes: its state, nothing else."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class _AllowListUnpickler(pickle.Unpickler):
    _numpy = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._numpy:
            core = np._core if hasattr(np, "_core") else np.core
            return getattr(np, name) if module == "numpy" else getattr(core.multiarray, name)
        if (module, name) == ("sklearn.decomposition._pca", "PCA"):
            return _Attributes
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: a PCA pickle holds numpy arrays and a PCA object only"
        )


def read_pca_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """The ``mean_`` and ``components_`` of a pickled scikit-learn PCA, parsed with an allow-list
    (no code from the file runs). Whitened PCAs are refused (the reference's is not)."""
    with open(path, "rb") as f:
        obj = _AllowListUnpickler(f).load()
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or "components_" not in state or "mean_" not in state:
        raise ValueError(f"{path}: not a pickled scikit-learn PCA")
    if state.get("whiten"):
        raise ValueError(f"{path}: a whitened PCA; Prismer's is not whitened")
    return {"mean": np.asarray(state["mean_"]), "components": np.asarray(state["components_"])}


def convert_label_space(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """The reference's ``dataset/`` label files in ``folder`` -> one safetensors file ``out``."""
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    tensors: dict[str, Tensor] = {}
    labels: dict[str, list[str]] = {}
    for name in TABLES:
        path = folder / f"{name}_features.pt"
        if not path.is_file():
            continue
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or "features" not in data or "labels" not in data:
            raise ValueError(f"{path}: expected {{'labels': [...], 'features': (K, D)}}")
        if len(data["labels"]) != data["features"].shape[0]:
            raise ValueError(
                f"{path}: {len(data['labels'])} labels but {data['features'].shape[0]} rows"
            )
        tensors[name] = data["features"].float().contiguous()
        labels[name] = [str(x) for x in data["labels"]]
    bg = folder / "background_features.pt"
    if not bg.is_file():
        raise FileNotFoundError(f"{bg} does not exist: the reference's dataset/ folder has it")
    tensors["background"] = (
        torch.load(bg, map_location="cpu", weights_only=True).float().reshape(-1)
    )
    pca = folder / "clip_pca.pkl"
    if pca.is_file():
        p = read_pca_pickle(pca)
        tensors["pca_mean"] = torch.from_numpy(p["mean"]).float()
        tensors["pca_components"] = torch.from_numpy(p["components"]).float().contiguous()
    if not labels:
        raise FileNotFoundError(f"{folder} has none of {[t + '_features.pt' for t in TABLES]}")
    dims = {t.shape[-1] for k, t in tensors.items() if not k.startswith("pca_")}
    if "pca_components" in tensors:
        dims.add(tensors["pca_components"].shape[0])
    if len(dims) != 1:
        raise ValueError(f"{folder}: label features of different widths {sorted(dims)}")
    meta = {"format": FORMAT, "labels": json.dumps(labels), "encoder": CLIP_L14}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return out


class PrismerLabelSpace:
    """Label names -> Prismer's 64-d label features (the :class:`LabelEmbedder` interface).

    ``embed(names, table)``: ``"background"`` -> the reference's background vector; a name of the
    expert's table (its ``label_table``: "coco", "ade", "detection") -> that row (exact name, then
    the cleaned name); any other name (free text, e.g. OCR words) -> CLIP ViT-L/14's projected text
    features through the reference PCA (needs the CLIP weights: hub id or local folder)."""

    def __init__(
        self,
        tables: dict[str, tuple[list[str], Tensor]],
        background: Tensor,
        pca: tuple[Tensor, Tensor] | None = None,
        encoder: TextEncoder | None = None,
    ) -> None:
        self.tables = tables
        self.background = background
        self.pca = pca
        self.encoder = encoder
        self.dim = background.shape[-1]
        self._index: dict[str, dict[str, int]] = {}
        for t, (names, _) in tables.items():
            index = {clean_label(n): i for i, n in enumerate(names)}
            # the tables follow the standard class orders, whose names our experts use
            standard = STANDARD_NAMES.get(t, ())
            if len(standard) == len(names):
                index |= {n: i for i, n in enumerate(standard)}
            self._index[t] = index | {n: i for i, n in enumerate(names)}
        self._cache: dict[str, Tensor] = {}

    @staticmethod
    def is_label_space(path: str | Path) -> bool:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("format") == FORMAT
        except Exception:
            return False

    @classmethod
    def load(
        cls, path: str | Path, encoder: str | None = None, device: str = "cpu"
    ) -> PrismerLabelSpace:
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not cls.is_label_space(path):
            raise ValueError(
                f"{path} is not a Prismer label space: convert the reference's dataset/ files with "
                "`prismkit convert prismer-labels DIR --out FILE`"
            )
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        labels = json.loads(meta["labels"])
        tables = {name: (labels[name], t[name]) for name in labels}
        pca = (t["pca_mean"], t["pca_components"]) if "pca_mean" in t else None
        text = TextEncoder(encoder or meta.get("encoder", CLIP_L14), device=device, normalize=False)
        return cls(tables, t["background"], pca, text)

    def embed(self, names: Sequence[str], table: str | None = None) -> Tensor:
        """``names`` (K strings) -> ``(K, dim)`` float32 on the CPU."""
        rows: list[Tensor | None] = []
        free: list[str] = []
        lookup = self._index.get(table or "", {})
        feats = self.tables[table][1] if table in self.tables else None
        for n in names:
            if n == BACKGROUND:
                rows.append(self.background)
            elif n in lookup or clean_label(n) in lookup:
                rows.append(feats[lookup.get(n, lookup.get(clean_label(n)))])
            elif n in self._cache:
                rows.append(self._cache[n])
            else:
                rows.append(None)
                free.append(n)
        if free:
            if self.pca is None or self.encoder is None:
                raise ValueError(
                    f"labels {free[:5]} are not in the {table!r} table and the label space has no PCA "
                    "for free text: convert the reference's clip_pca.pkl with it"
                )
            mean, components = self.pca
            emb = (self.encoder(list(dict.fromkeys(free))) - mean) @ components.T
            for n, row in zip(dict.fromkeys(free), emb, strict=True):
                self._cache[n] = row
            rows = [
                r if r is not None else self._cache[n] for r, n in zip(rows, names, strict=True)
            ]
        if not rows:
            return torch.zeros(0, self.dim)
        return torch.stack(rows).float()
