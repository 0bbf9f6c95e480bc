"""Built-in dataset readers: COCO-style captions, VQAv2, image folders, webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from prismkit.core.data import (
    CAPTION_PROMPT,
    VQA_PROMPT,
    DataError,
    Sample,
    VLDataset,
    _check_image,
    _read_json,
    _subset,
)
from prismkit.core.processor import load_image


class CocoCaptions(VLDataset):
    """COCO-style caption JSON (``images`` with ``id``/``file_name`` and ``annotations`` with
    ``image_id``/``caption``), or a Karpathy-style list of ``{"image": path, "caption": str | [str]}``.
    One sample per (image, caption); ``references`` holds all captions of the image."""

    name = "coco_captions"
    task = "caption"

    def __init__(
        self,
        *,
        annotations: str,
        image_root: str = ".",
        split: str = "train",
        fraction: float = 1.0,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        path, root = Path(annotations), Path(image_root)
        data = _read_json(path)
        caps: dict[str, list[str]] = {}
        if isinstance(data, dict) and "annotations" in data:
            files = {im["id"]: im["file_name"] for im in data.get("images", [])}
            for n, ann in enumerate(data["annotations"]):
                if ann.get("image_id") not in files:
                    raise DataError(
                        f"{path}: annotations[{n}] names image_id {ann.get('image_id')!r}, not in 'images'"
                    )
                caps.setdefault(files[ann["image_id"]], []).append(ann.get("caption", ""))
        elif isinstance(data, list):
            for n, item in enumerate(data):
                if "image" not in item or "caption" not in item:
                    raise DataError(f"{path}: item {n} needs 'image' and 'caption' fields")
                c = item["caption"]
                caps.setdefault(item["image"], []).extend(c if isinstance(c, list) else [c])
        else:
            raise DataError(f"{path}: expected a COCO dict with 'annotations' or a list of items")
        samples = []
        for file, texts in caps.items():
            img = _check_image(root / file, path, "an annotation")
            clean = [t.strip() for t in texts]
            if not all(clean):
                raise DataError(f"{path}: image {file} has an empty caption")
            samples += [Sample(img, file, prompt, t, clean) for t in clean]
        super().__init__(_subset(samples, fraction, seed))


class VQAv2(VLDataset):
    """VQAv2 questions + annotations JSON (the official format). The answer list is the
    ``answer_list`` file if given, else the ``top_answers`` most common answers of the split;
    questions whose answer is outside it are kept for evaluation and dropped for training."""

    name = "vqav2"
    task = "vqa"

    def __init__(
        self,
        *,
        questions: str,
        annotations: str,
        image_root: str,
        split: str = "train",
        image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg",
        subtype: str = "train2014",
        answer_list: str | None = None,
        top_answers: int = 3129,
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        qpath, apath, root = Path(questions), Path(annotations), Path(image_root)
        qs = _read_json(qpath).get("questions")
        anns = _read_json(apath).get("annotations")
        if qs is None or anns is None:
            raise DataError(f"{qpath} needs 'questions' and {apath} needs 'annotations'")
        by_qid = {a["question_id"]: a for a in anns}
        if answer_list:
            answers = [str(a) for a in _read_json(Path(answer_list))]
        else:
            answers = [
                a
                for a, _ in Counter(a["multiple_choice_answer"] for a in anns).most_common(
                    top_answers
                )
            ]
        known = set(answers)
        samples = []
        for n, q in enumerate(qs):
            ann = by_qid.get(q["question_id"])
            if ann is None:
                raise DataError(
                    f"{apath}: no annotation for question_id {q['question_id']} ({qpath} questions[{n}])"
                )
            img = _check_image(
                root / image_pattern.format(subtype=subtype, image_id=q["image_id"]),
                qpath,
                f"questions[{n}]",
            )
            target = ann["multiple_choice_answer"]
            if split == "train" and target not in known:
                continue
            refs = [a["answer"] for a in ann.get("answers", [])] or [target]
            samples.append(
                Sample(
                    img,
                    str(q["image_id"]),
                    VQA_PROMPT.format(q["question"]),
                    target,
                    refs,
                    task="vqa",
                    question_type=ann.get("answer_type", ""),
                )
            )
        super().__init__(_subset(samples, fraction, seed), answers)


class ImageFolderCaptions(VLDataset):
    """A folder of images and a captions file: TSV ``relative/path<TAB>caption`` or JSONL
    ``{"image": ..., "caption": ...}``."""

    name = "image_folder"
    task = "caption"

    def __init__(
        self,
        *,
        root: str,
        captions: str,
        split: str = "train",
        fraction: float = 1.0,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        root_p, cap_p = Path(root), Path(captions)
        if not cap_p.is_file():
            raise DataError(f"captions file {cap_p} does not exist")
        pairs = []
        for n, line in enumerate(cap_p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if cap_p.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                    pairs.append((item["image"], item["caption"]))
                except (json.JSONDecodeError, KeyError) as e:
                    raise DataError(
                        f"{cap_p} line {n}: expected {{'image': ..., 'caption': ...}} ({e})"
                    ) from None
            else:
                file, sep, cap = line.partition("\t")
                if not sep:
                    raise DataError(f"{cap_p} line {n}: expected 'path<TAB>caption'")
                pairs.append((file, cap))
        refs: dict[str, list[str]] = {}
        for file, cap in pairs:
            if not cap.strip():
                raise DataError(f"{cap_p}: image {file} has an empty caption")
            refs.setdefault(file, []).append(cap.strip())
        samples = [
            Sample(_check_image(root_p / f, cap_p, "a line"), f, prompt, c, refs[f])
            for f, c in pairs
        ]
        super().__init__(_subset(samples, fraction, seed))


def iter_webdataset(shards: list[str]) -> Iterator[tuple[str, Tensor, str]]:
    """``(key, image, caption)`` from webdataset-style tar shards (``KEY.jpg|png`` + ``KEY.txt``
    or ``KEY.json`` with a ``caption``), streamed member by member."""
    for shard in shards:
        try:
            tar = tarfile.open(shard, "r|*")  # noqa: SIM115 - closed by the with-block below
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"shard {shard} cannot be opened: {e}") from None
        current: dict[str, Any] = {}
        key = None
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, _, ext = member.name.partition(".")
                if key is not None and base != key:
                    yield _wds_sample(shard, key, current)
                    current = {}
                key = base
                current[ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield _wds_sample(shard, key, current)


def _wds_sample(shard: str, key: str, parts: dict[str, bytes]) -> tuple[str, Tensor, str]:
    img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
    if img_ext is None:
        raise DataError(f"shard {shard}: sample {key} has no image")
    if "txt" in parts:
        caption = parts["txt"].decode()
    elif "json" in parts:
        caption = json.loads(parts["json"]).get("caption", "")
    else:
        raise DataError(f"shard {shard}: sample {key} has no .txt or .json caption")
    if not caption.strip():
        raise DataError(f"shard {shard}: sample {key} has an empty caption")
    try:
        image = load_image(Image.open(io.BytesIO(parts[img_ext])))
    except Exception as e:
        raise DataError(f"shard {shard}: sample {key} image cannot be decoded: {e}") from None
    return key, image, caption.strip()


class WebDatasetCaptions(VLDataset):
    """Captions from webdataset tar shards (read once into memory; for corpora larger than
    memory use :func:`iter_webdataset` directly as a stream)."""

    name = "webdataset"
    task = "caption"

    def __init__(
        self,
        *,
        shards: list[str],
        split: str = "train",
        fraction: float = 1.0,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        samples = [
            Sample(img, key, prompt, cap, [cap]) for key, img, cap in iter_webdataset(list(shards))
        ]
        super().__init__(_subset(samples, fraction, seed))
