"""Built-in dataset readers: COCO-style captions, VQAv2, image folders, webdataset shards."""

from __future__ import annotations

import io
import json
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
    Problems,
    Sample,
    VLDataset,
    _check_image,
    _read_json,
    _subset,
    as_object,
    entry,
)
from prismkit.core.processor import load_image
from prismkit.core.shards import expand_shards, read_shard


class CocoCaptions(VLDataset):
    """COCO-style caption JSON (``images`` with ``id``/``file_name`` and ``annotations`` with
    ``image_id``/``caption``), or a Karpathy-style list of ``{"image": path, "caption": str | [str]}``.
    One sample per (image, caption); ``references`` holds all captions of the image.

    Options: ``annotations`` (the JSON file), ``image_root`` (folder the file names are relative
    to, default "."), ``prompt``. Every entry is checked when the dataset is built; all bad ones
    are reported at once, by file and index."""

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
        bad = Problems(str(path))
        caps: dict[str, list[tuple[str, str]]] = {}  # file -> [(caption, where)]
        if isinstance(data, dict) and "annotations" in data:
            files = {}
            images = entry(data, "images", list, f"{path}", bad, default=[])
            for n, im in enumerate(images or []):
                where = f"{path} images[{n}]"
                id_, file = (
                    entry(im, "id", (int, str), where, bad),
                    entry(im, "file_name", str, where, bad),
                )
                if id_ is not None and file is not None:
                    files[id_] = file
            anns = entry(data, "annotations", list, f"{path}", bad) or []
            for n, ann in enumerate(anns):
                where = f"{path} annotations[{n}]"
                if as_object(ann, where, bad) is None:
                    continue
                id_ = entry(ann, "image_id", (int, str), where, bad)
                text = entry(ann, "caption", str, where, bad)
                if id_ is None or text is None:
                    continue
                if id_ not in files:
                    bad.add(f"{where}: image_id {id_!r} is not in 'images'")
                    continue
                caps.setdefault(files[id_], []).append((text, where))
        elif isinstance(data, list):
            for n, item in enumerate(data):
                where = f"{path} [{n}]"
                if as_object(item, where, bad) is None:
                    continue
                file = entry(item, "image", str, where, bad)
                c = entry(item, "caption", (str, list), where, bad)
                if file is None or c is None:
                    continue
                for k, text in enumerate(c if isinstance(c, list) else [c]):
                    w = f"{where}.caption[{k}]" if isinstance(c, list) else where
                    if not isinstance(text, str):
                        bad.add(f"{w}: caption must be a string, got {type(text).__name__}")
                    else:
                        caps.setdefault(file, []).append((text, w))
        else:
            raise DataError(f"{path}: expected a COCO dict with 'annotations' or a list of items")
        samples = []
        for file, texts in caps.items():
            img = _check_image(root / file, texts[0][1], bad)
            clean = [t.strip() for t, _ in texts]
            for (_, where), t in zip(texts, clean, strict=True):
                if not t:
                    bad.add(f"{where}: empty caption for image {file}")
            samples += [
                Sample(img, file, prompt, t, [c for c in clean if c], where)
                for t, (_, where) in zip(clean, texts, strict=True)
                if t
            ]
        bad.check()
        super().__init__(_subset(samples, fraction, seed))


class VQAv2(VLDataset):
    """VQAv2 questions + annotations JSON (the official format). The answer list is the
    ``answer_list`` file if given, else the ``top_answers`` most common answers of the split;
    questions whose answer is outside it are kept for evaluation and dropped for training.

    Options: ``questions``, ``annotations`` (the two JSON files), ``image_root``,
    ``image_pattern`` (default ``COCO_{subtype}_{image_id:012d}.jpg``), ``subtype``
    (``train2014``), ``answer_list`` (a JSON list), ``top_answers`` (3129)."""

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
        qs = entry(as_object(_read_json(qpath), str(qpath)), "questions", list, str(qpath))  # type: ignore[arg-type]
        anns = entry(as_object(_read_json(apath), str(apath)), "annotations", list, str(apath))  # type: ignore[arg-type]
        bad = Problems(f"{qpath} and {apath}")
        by_qid: dict[Any, dict] = {}
        for n, a in enumerate(anns):
            where = f"{apath} annotations[{n}]"
            if as_object(a, where, bad) is None:
                continue
            qid = entry(a, "question_id", (int, str), where, bad)
            target = entry(a, "multiple_choice_answer", str, where, bad)
            answers = entry(a, "answers", list, where, bad, default=[])
            ok = qid is not None and target is not None and answers is not None
            for k, x in enumerate(answers or []):
                w = f"{where}.answers[{k}]"
                if as_object(x, w, bad) is None or entry(x, "answer", str, w, bad) is None:
                    ok = False
            if ok:
                by_qid[qid] = a
        if answer_list:
            listed = _read_json(Path(answer_list))
            if not isinstance(listed, list):
                raise DataError(f"answer list {answer_list}: expected a JSON list of answers")
            answers = [str(a) for a in listed]
        else:
            answers = [
                a
                for a, _ in Counter(
                    a["multiple_choice_answer"] for a in by_qid.values()
                ).most_common(top_answers)
            ]
        known = set(answers)
        samples = []
        for n, q in enumerate(qs):
            where = f"{qpath} questions[{n}]"
            if as_object(q, where, bad) is None:
                continue
            qid = entry(q, "question_id", (int, str), where, bad)
            image_id = entry(q, "image_id", int, where, bad)
            question = entry(q, "question", str, where, bad)
            if qid is None or image_id is None or question is None:
                continue
            ann = by_qid.get(qid)
            if ann is None:
                if not any(isinstance(a, dict) and a.get("question_id") == qid for a in anns):
                    bad.add(f"{where}: no annotation in {apath} for question_id {qid!r}")
                continue
            img = _check_image(
                root / image_pattern.format(subtype=subtype, image_id=image_id), where, bad
            )
            target = ann["multiple_choice_answer"]
            if split == "train" and target not in known:
                continue
            refs = [a["answer"] for a in ann.get("answers", [])] or [target]
            samples.append(
                Sample(
                    img,
                    str(image_id),
                    VQA_PROMPT.format(question),
                    target,
                    refs,
                    where,
                    "vqa",
                    question_type=ann.get("answer_type", ""),
                )
            )
        bad.check()
        super().__init__(_subset(samples, fraction, seed), answers)


class ImageFolderCaptions(VLDataset):
    """A folder of images and a captions file: TSV ``relative/path<TAB>caption`` or JSONL
    ``{"image": ..., "caption": ...}``.

    Options: ``root`` (the image folder), ``captions`` (the .tsv or .jsonl file), ``prompt``."""

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
        bad = Problems(str(cap_p))
        pairs = []
        for n, line in enumerate(cap_p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{cap_p} line {n}"
            if cap_p.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.add(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if as_object(item, where, bad) is None:
                    continue
                file = entry(item, "image", str, where, bad)
                cap = entry(item, "caption", str, where, bad)
                if file is not None and cap is not None:
                    pairs.append((file, cap, where))
            else:
                file, sep, cap = line.partition("\t")
                if not sep:
                    bad.add(f"{where}: expected 'path<TAB>caption'")
                    continue
                pairs.append((file, cap, where))
        refs: dict[str, list[str]] = {}
        for file, cap, where in pairs:
            if not cap.strip():
                bad.add(f"{where}: empty caption for image {file}")
            else:
                refs.setdefault(file, []).append(cap.strip())
        samples = [
            Sample(_check_image(root_p / f, where, bad), f, prompt, c.strip(), refs[f], where)
            for f, c, where in pairs
            if c.strip()
        ]
        bad.check()
        super().__init__(_subset(samples, fraction, seed))


def iter_webdataset(
    shards: list[str], problems: Problems | None = None
) -> Iterator[tuple[str, Tensor, str]]:
    """``(key, image, caption)`` from webdataset-style tar shards (``KEY.jpg|png`` + ``KEY.txt``
    or ``KEY.json`` with a ``caption``), streamed sample by sample through the ``webdataset``
    package (paths, brace patterns, ``pipe:`` commands). A bad sample or shard raises
    ``DataError`` naming shard and key, or with ``problems`` is recorded there and skipped."""

    def problem(message: str) -> None:
        if problems is None:
            raise DataError(message)
        problems.add(message)

    for shard in (u for s in shards for u in expand_shards(s)):
        for raw in read_shard(shard, problem):
            parts = {k: v for k, v in raw.items() if not k.startswith("__")}
            yield from _wds_sample(shard, raw["__key__"], parts, problems)


def _wds_sample(
    shard: str, key: str, parts: dict[str, bytes], problems: Problems | None
) -> Iterator[tuple[str, Tensor, str]]:
    try:
        yield _wds_decode(shard, key, parts)
    except DataError as e:
        if problems is None:
            raise
        problems.add(str(e))


def _wds_decode(shard: str, key: str, parts: dict[str, bytes]) -> tuple[str, Tensor, str]:
    where = f"shard {shard}: sample {key}"
    img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
    if img_ext is None:
        raise DataError(f"{where} has no image (.jpg, .jpeg, .png or .webp)")
    if "txt" in parts:
        try:
            caption = parts["txt"].decode()
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: .txt caption is not UTF-8 ({e})") from None
    elif "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: .json is not valid JSON ({e})") from None
        caption = entry(as_object(meta, f"{where}.json"), "caption", str, f"{where}.json")  # type: ignore[arg-type]
    else:
        raise DataError(f"{where} has no .txt or .json caption")
    if not caption.strip():
        raise DataError(f"{where} has an empty caption")
    try:
        image = load_image(Image.open(io.BytesIO(parts[img_ext])))
    except Exception as e:
        raise DataError(f"{where}: image cannot be decoded: {e}") from None
    return key, image, caption.strip()


class WebDatasetCaptions(VLDataset):
    """Captions from webdataset tar shards, read once into memory (small sets, evaluation); to
    train on corpora larger than memory use the ``webdataset_stream`` reader.

    Options: ``shards`` (a list of .tar paths), ``prompt``."""

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
        if isinstance(shards, str) or not isinstance(shards, list):
            raise DataError(f"webdataset: option 'shards' must be a list of paths, got {shards!r}")
        bad = Problems(f"shards {', '.join(map(str, shards))}")
        samples = [
            Sample(img, key, prompt, cap, [cap], f"{shard} sample {key}")
            for shard in shards
            for key, img, cap in iter_webdataset([shard], bad)
        ]
        bad.check()
        super().__init__(_subset(samples, fraction, seed))
