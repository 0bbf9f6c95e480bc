"""Tiny webdataset shards for the streaming tests (written with webdataset's TarWriter)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("red", "green", "blue", "circle", "square", "shape")


def png_bytes(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(
    folder: Path, shards: int, per_shard: int, prefix: str = "s", caption_format: str = "txt"
) -> list[str]:
    """``shards`` tar files ``folder/{prefix}-000000.tar`` ... of ``per_shard`` samples each,
    keys ``{prefix}{shard:03d}_{i:04d}``; returns the keys in write order."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{prefix}-{s:06d}.tar")) as w:
            for i in range(per_shard):
                key = f"{prefix}{s:03d}_{i:04d}"
                caption = " ".join(WORDS[(s + i + k) % len(WORDS)] for k in range(3))
                sample = {"__key__": key, "png": png_bytes(s * 10_000 + i)}
                if caption_format == "txt":
                    sample["txt"] = caption
                else:
                    sample["json"] = json.dumps({"caption": caption, "source": prefix}).encode()
                w.write(sample)
                keys.append(key)
    return keys
