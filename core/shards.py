"""Webdataset shards: names, brace patterns, reading raw samples (through the maintained
``webdataset`` package: local paths, ``pipe:`` commands, URLs), decoding their images.

Shared by the streaming training path (``prismkit.engine.stream``), the shard label store
(``prismkit.labels.shard_store``) and the streaming readers.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from prismkit.core.data import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """Shard URLs from a brace pattern (``"data/{000000..000099}.tar"``, several joined with
    ``::``) or a list of patterns; local paths, ``pipe:CMD`` and URLs are kept as given."""
    from webdataset.shardlists import expand_urls

    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise DataError(f"{what} must be a string pattern or a list of them, got {spec!r}")
    urls = [u for s in items for u in expand_urls(s)]
    if not urls:
        raise DataError(f"{what} {spec!r} names no shard")
    return urls


def shard_id(url: str) -> str:
    """A shard's name in label stores: its folder and stem (``/data/cc3m/000012.tar`` ->
    ``cc3m_000012``); for ``pipe:`` commands the last word that names a ``.tar``."""
    if url.startswith("pipe:"):
        words = [w for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url[5:]
    parts = url.split("?", 1)[0].rstrip("/").replace("\\", "/").split("/")
    stem = parts[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = f"{parts[-2]}_{stem}" if len(parts) > 1 and parts[-2] not in ("", ".", "..") else stem
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "shard"


def _describe(exn: BaseException) -> str:
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


def read_shard(url: str, problem: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (webdataset's ``url_opener`` -> ``tar_file_expander`` ->
    ``group_by_keys``). A shard that cannot be opened or is damaged is reported once through
    ``problem``, naming the shard and the sample being read; that sample (perhaps incomplete)
    and the rest of the shard are skipped."""
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

    state: dict[str, Any] = {"member": None, "broken": None}

    def seen(name: str) -> str:
        state["member"] = name
        return name

    def handler(exn: BaseException) -> bool:
        if state["broken"] is None:
            member = state["member"]
            state["broken"] = base_plus_ext(member)[0] if member else ""
            if member:
                problem(
                    f"shard {url}: damaged or unreadable in sample {state['broken']} (member "
                    f"{member}) ({_describe(exn)}); that sample and the rest of the shard skipped"
                )
            else:
                problem(f"shard {url}: cannot be opened or read ({_describe(exn)}); skipped")
        return True

    opened = url_opener([{"url": url}], handler=handler)
    files = tar_file_expander(opened, handler=handler, rename_files=seen)
    for raw in group_by_keys(files, handler=handler):
        if state["broken"] is not None and raw["__key__"] == state["broken"]:
            continue  # the sample the damage cut
        yield raw


def image_of(raw: dict[str, Any], where: str) -> Tensor:
    """The decoded ``(3, H, W)`` image of a raw sample (the first of jpg, jpeg, png, webp)."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise DataError(f"{where}: no image (.jpg, .jpeg, .png or .webp)")
    from PIL import Image

    from prismkit.core.processor import load_image

    try:
        with Image.open(io.BytesIO(raw[ext])) as im:
            im.load()
            return load_image(im)
    except Exception as e:
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # no addresses
        raise DataError(
            f"{where}: image .{ext} cannot be decoded ({type(e).__name__}: {why})"
        ) from None
