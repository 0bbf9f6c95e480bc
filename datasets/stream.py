"""``webdataset_stream``: caption shards streamed for pre-training (CC3M, CC12M, LAION, COCO, VG
in the webdataset format, e.g. as img2dataset writes them), one source or a weighted mixture."""

from __future__ import annotations

import json
from typing import Any

from prismkit.core.data import CAPTION_PROMPT, DataError, Sample
from prismkit.core.shards import expand_shards, image_of
from prismkit.engine.stream import Source, StreamingDataset


def caption_of(raw: dict[str, Any], where: str) -> str:
    """The caption of a raw sample: ``KEY.txt`` (UTF-8), else ``KEY.json``'s ``caption`` (a
    string, or a list whose first string is taken). ``DataError`` naming ``where`` otherwise."""
    if "txt" in raw:
        try:
            text = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: .txt caption is not UTF-8 ({e})") from None
    elif "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: .json is not valid JSON ({e})") from None
        text = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(text, list):
            text = next((t for t in text if isinstance(t, str)), None)
        if not isinstance(text, str):
            raise DataError(f"{where}: .json has no 'caption' string (missing caption)")
    else:
        raise DataError(f"{where}: no .txt or .json caption (missing caption)")
    if not text.strip():
        raise DataError(f"{where}: empty caption")
    return text.strip()


class WebDatasetStream(StreamingDataset):
    """Image + caption samples streamed from webdataset tar shards (``KEY.jpg|png|webp`` with
    ``KEY.txt`` or ``KEY.json`` ``{"caption": ...}``); ``prismkit train`` streams them (see
    ``prismkit.engine.stream``: each sample once per epoch across processes and workers,
    resumable mid-epoch).

    Options: ``shards`` (a brace pattern such as ``"cc3m/{000000..000331}.tar"``, several joined
    with ``::``, or a list; local paths, ``pipe:curl -s URL`` or URLs) or ``sources`` (a list of
    ``{name, shards, weight}`` tables: a weighted mixture, each source's samples ``weight``
    times per epoch), ``prompt``, ``shuffle_buffer`` (1000), ``shuffle_shards`` (true),
    ``on_error`` (``"skip"``: bad samples and damaged shards are named, counted and skipped;
    ``"raise"``: the run stops on the first). ``fraction`` scales every weight."""

    name = "webdataset_stream"
    task = "caption"

    def __init__(
        self,
        *,
        shards: str | list[str] | None = None,
        sources: list[dict[str, Any]] | None = None,
        split: str = "train",
        fraction: float = 1.0,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        on_error: str = "skip",
    ) -> None:
        if (shards is None) == (sources is None):
            raise DataError(
                "webdataset_stream: give one of the options 'shards' (a pattern or list) or "
                "'sources' (a list of {name, shards, weight})"
            )
        if not 0 < fraction <= 1:
            raise DataError(f"fraction must be in (0, 1], got {fraction}")
        if shards is not None:
            sources = [{"name": "shards", "shards": shards}]
        parsed = []
        for n, item in enumerate(sources or []):
            where = f"webdataset_stream: sources[{n}]"
            if not isinstance(item, dict) or "shards" not in item:
                raise DataError(f"{where} must be a table with 'shards' (and 'name', 'weight')")
            unknown = sorted(set(item) - {"name", "shards", "weight"})
            if unknown:
                raise DataError(f"{where}: unknown key(s) {unknown}; it takes name, shards, weight")
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise DataError(f"{where}: 'weight' must be a number, got {weight!r}")
            urls = expand_shards(item["shards"], f"{where}.shards")
            parsed.append(
                Source(str(item.get("name", f"source{n}")), tuple(urls), float(weight) * fraction)
            )
        super().__init__(parsed, shuffle_buffer, shuffle_shards, on_error, seed)
        self.prompt = prompt

    def decode(self, raw: dict[str, Any]) -> Sample:
        key = raw["__key__"]
        where = f"shard {raw.get('__url__')}: sample {key}"
        caption = caption_of(raw, where)
        image = image_of(raw, where)
        return Sample(image, key, self.prompt, caption, [caption], where)
