"""``prismkit muvla build``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prismkit.muvla.corpus import (
    AUTO_TAGGER,
    DEFAULT_SENTENCE_ENCODER,
    build_pairs,
    choose_tagger,
    list_images,
)


def cmd_build(args: argparse.Namespace) -> int:
    """``prismkit muvla build``."""
    from prismkit.core.host import get_plugin_manager
    from prismkit.labels.embedding import TextEncoder

    host = getattr(args, "host", None) or get_plugin_manager(getattr(args, "plugins_toml", None))
    tagger, why = choose_tagger(host, args.tags_expert, device=args.device)
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
    report.tagger = why
    print(report.summary())
    if report.no_tags:
        print(
            f"warning: {len(report.no_tags)} image(s) had no tags and were skipped", file=sys.stderr
        )
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """``muvla build``."""
    sub = p.add_subparsers(dest="muvla_command", required=True)
    b = sub.add_parser("build", help="retrieve the K corpus sentences closest to each image's tags")
    b.add_argument("--images", required=True, help="image folder, or a file listing image paths")
    b.add_argument("--corpus", required=True, type=Path, help="UTF-8 text, one sentence per line")
    b.add_argument("--out", required=True, type=Path, help="pairs JSONL to write")
    b.add_argument("--k", type=int, default=5, help="sentences retrieved per image")
    b.add_argument("--shard-size", type=int, default=100_000, help="sentences per index shard")
    b.add_argument("--index", type=Path, default=None, help="shard folder (default OUT.index)")
    b.add_argument(
        "--tags-expert",
        default=AUTO_TAGGER,
        help="expert whose tags(images) query the corpus; auto: a detection expert when one is "
        "enabled and has its weights, else classifier tags (obj_tags_cam)",
    )
    b.add_argument("--encoder", default=DEFAULT_SENTENCE_ENCODER, help="sentence encoder")
    b.add_argument("--batch-size", type=int, default=256, help="sentences per encoder call")
    b.add_argument("--image-batch", type=int, default=32, help="images per tags call")
    b.add_argument("--keep-non-english", action="store_true", help="keep non-ASCII-letter lines")
    b.add_argument("--min-letters", type=float, default=0.6, help="ASCII-letter fraction to keep")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_build)
