"""Text-only data for the prefix LM (SimVLM mixed C4 into its image-text pre-training)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from prismkit.core.data import DataError, Sample, VLDataset, _subset


def word_chunks(text: str, words: int) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``words`` whitespace-separated words
    (``words <= 0``: the whole text, whitespace normalised). Nothing is dropped."""
    parts = text.split()
    if words <= 0 or len(parts) <= words:
        return [" ".join(parts)] if parts else []
    return [" ".join(parts[i : i + words]) for i in range(0, len(parts), words)]


class TextCorpus(VLDataset):
    """A UTF-8 text file, one document per line, as text-only samples (``image=None``,
    ``prompt=""``, ``target`` = the text). Empty lines are skipped; ``chunk_words > 0`` cuts a
    long document into consecutive chunks of that many words, each its own sample (C4 documents
    are far longer than a caption model's text).

    Mix it into image-text training with the run config's ``data.text_dataset = "text_corpus"``,
    ``data.text_options = {path = "..."}`` and ``data.text_ratio`` (SimVLM: 512 text-only
    samples beside 4,096 image-text pairs per batch, ``text_ratio = 0.111``)."""

    name: ClassVar[str] = "text_corpus"
    task: ClassVar[str] = "text"

    def __init__(
        self,
        *,
        path: str,
        split: str = "train",
        chunk_words: int = 0,
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        source = Path(path)
        if not source.is_file():
            raise DataError(f"text corpus {source} does not exist: set data.text_options.path")
        samples: list[Sample] = []
        with open(source, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{source} line {n} is not UTF-8 ({e.reason} at byte {e.start}): "
                        "re-encode the file as UTF-8"
                    ) from None
                for k, chunk in enumerate(word_chunks(line, chunk_words)):
                    samples.append(Sample(None, f"{source.name}:{n}:{k}", "", chunk, [chunk]))
        if not samples:
            raise DataError(f"text corpus {source} has no non-empty line")
        super().__init__(_subset(samples, fraction, seed))
