"""Image-caption pairs as JSONL (CapFilt's input and output, retrieval sets) and the
``blip_pairs`` dataset reader over such files.

One pair per line: ``{"image": path, "caption": str}``, optionally ``"image_id"`` (pairs with
the same id show the same image: retrieval positives; default the image path) and
``"source"`` (``"human"``, ``"web"``, ``"synthetic"``). Relative image paths are read against
``image_root`` (default: the file's folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prismkit.blip.text import pre_caption
from prismkit.core.data import CAPTION_PROMPT, DataError, Sample, VLDataset, _subset
from prismkit.core.io import atomic_write


@dataclass
class Pair:
    # image file path
    image: str
    # caption text
    caption: str
    # "web", "synthetic" or "human"
    source: str
    # id shared by the pairs of one image
    image_id: str = ""
    # the filter's ITM match probability (None: not scored)
    itm_score: float | None = None

    def __post_init__(self) -> None:
        self.image_id = self.image_id or self.image

    def to_json(self) -> str:
        return json.dumps(
            {
                "image": self.image,
                "caption": self.caption,
                "image_id": self.image_id,
                "source": self.source,
                "itm_score": self.itm_score,
            }
        )


def read_pairs(path: str | Path, source: str, image_root: str | Path | None = None) -> list[Pair]:
    """A JSONL pairs file -> pairs. Bad lines are one-line errors naming file, line and field."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise DataError(f"{path}:{n}: each line needs 'image' and 'caption' fields")
        if not isinstance(item["caption"], str):
            raise DataError(f"{path}:{n}: 'caption' must be a string, got {item['caption']!r}")
        image = Path(item["image"])
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise DataError(f"{path}:{n}: image {image} does not exist")
        pairs.append(
            Pair(
                str(image),
                item["caption"],
                item.get("source", source),
                str(item.get("image_id", "")),
            )
        )
    if not pairs:
        raise DataError(f"{path} holds no pairs")
    return pairs


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    """JSONL, written atomically (a reader never sees half a file)."""
    text = "".join(q.to_json() + "\n" for q in pairs)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class BlipPairs(VLDataset):
    """``blip_pairs``: a JSONL pairs file per split (``train = "..."``, ``test = "..."``), each
    caption cleaned as BLIP's readers do (``pre_caption``, ``max_words``). The prompt is the
    captioning prompt (BLIP's captioner learns ``a picture of`` + caption; its encoder tasks drop
    it). ``references`` are all captions of the image (for caption metrics)."""

    name = "blip_pairs"
    task = "caption"

    def __init__(
        self,
        *,
        split: str = "train",
        train: str = "",
        test: str = "",
        image_root: str | None = None,
        max_words: int = 30,
        fraction: float = 1.0,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        path = {"train": train, "test": test}.get(split, "")
        if not path:
            raise DataError(f"blip_pairs: no file for split {split!r}: set data.options.{split}")
        pairs = read_pairs(path, "data", image_root)
        refs: dict[str, list[str]] = {}
        for q in pairs:
            clean = pre_caption(q.caption, max_words)
            refs.setdefault(q.image_id, [])
            if clean:
                refs[q.image_id].append(clean)
        samples = [
            Sample(q.image, q.image_id, prompt, pre_caption(q.caption, max_words), refs[q.image_id])
            for q in pairs
        ]
        super().__init__(_subset(samples, fraction, seed))
