"""mu-VLA (Zhou et al., CVPR 2022) as a prismkit plugin: a weakly aligned corpus built by
retrieval, and the multi-granular objective trained on it.

1. **Corpus builder** (:func:`prismkit.muvla.corpus.build_pairs`, ``prismkit muvla build``): each
   image's tags (from the expert :func:`prismkit.muvla.corpus.choose_tagger` picks by its
   declared ``tag_source``: a detection expert when one is enabled and has its weights, else the
   classifier tags of ``obj_tags_cam``) are joined (``"tag1, tag2"``), embedded with a sentence encoder (MiniLM, offline) and matched
   by cosine against an unpaired text corpus. The corpus is cleaned while streamed (strip, empty
   lines, exact duplicates, optionally lines that are not mostly ASCII letters), embedded in
   batches and written as float16 safetensors shards holding the embeddings and each sentence's
   byte offset in the corpus file; shards are written atomically and reused by a rerun
   (resumable). Search streams over the shards keeping a running top-K per image
   (:func:`prismkit.muvla.corpus.streaming_topk`), so neither the corpus nor its embeddings need to
   fit in memory. Output: JSONL rows ``{"image", "sentence", "score", "rank", "tags"}``, and
   beside it each row's retrieval embeddings (tag query, sentence) for hard negatives.
2. **Objective** :class:`~prismkit.muvla.objective.MuVLAObjective` (head ``"muvla"``), the
   dataset reader :class:`~prismkit.muvla.data.MuVLAPairs` (``"muvla_pairs"``) that reads the
   JSONL, and the ``offline_default_muvla`` config.
"""

from __future__ import annotations

from pathlib import Path

from prismkit.core.cli import Command
from prismkit.core.config import register_config_folder
from prismkit.core.hookspecs import hookimpl
from prismkit.muvla.commands import configure
from prismkit.muvla.data import MuVLAPairs
from prismkit.muvla.objective import MuVLAObjective

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hookimpl
def register_commands(register) -> None:
    register(Command("muvla", "mu-VLA: weakly aligned corpus by tag retrieval", configure))


@hookimpl
def register_heads(register) -> None:
    register(MuVLAObjective)


@hookimpl
def register_datasets(register) -> None:
    register(MuVLAPairs)


@hookimpl
def register_model_configs(register) -> None:
    register_config_folder(register, CONFIG_DIR)
