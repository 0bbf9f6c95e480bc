"""Dataset readers (plugins) yielding image-text samples, and the batch collation.

Every reader yields :class:`Sample`; captioning sets carry a target caption, VQA sets a question
(prompt), the answers given by annotators and the closed answer list.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from prismkit.core.hookspecs import hookimpl
from prismkit.core.processor import load_image

CAPTION_PROMPT = "a picture of"
VQA_PROMPT = "question: {} answer:"


class DataError(ValueError):
    """A dataset file or sample is wrong; the message names the file and field."""


@dataclass
class Sample:
    # the image as a file path (label-store key) or an already decoded (3, H, W) tensor in [0, 1]
    image: str | Tensor
    # a stable id of the image (file path or dataset key) for labels and evaluation
    image_id: str
    # text the model is conditioned on (masked from the loss)
    prompt: str
    # text the model learns to produce
    target: str
    # VQA: every annotator answer (for the official accuracy); captioning: all references
    references: list[str] = field(default_factory=list)


def label_key(sample: Sample) -> str:
    """The label-store key of a sample's image: its file path (the store hashes the bytes)."""
    return sample.image if isinstance(sample.image, str) else sample.image_id


class VLDataset(Dataset):
    """Base of the readers: a list of samples plus what the task needs."""

    name: ClassVar[str]
    # "caption" or "vqa"
    task: ClassVar[str]

    def __init__(self, samples: list[Sample], answer_list: list[str] | None = None) -> None:
        if not samples:
            raise DataError(f"dataset {self.name!r} has no samples")
        self.samples = samples
        self.answer_list = answer_list

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def image(self, i: int) -> Tensor:
        img = self.samples[i].image
        return load_image(img) if isinstance(img, str) else img


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"dataset file {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"
        ) from None


def _subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(len(samples))[
        : max(1, int(len(samples) * fraction))
    ]
    return [samples[i] for i in sorted(order)]


def _check_image(path: Path, source: Path, where: str) -> str:
    if not path.is_file():
        raise DataError(f"{source}: {where} names image {path}, which does not exist")
    return str(path)


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
                Sample(img, str(q["image_id"]), VQA_PROMPT.format(q["question"]), target, refs)
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


def _easy_vqa(split: str) -> tuple[list[str], list[str], list[int], dict[int, str], list[str]]:
    import easy_vqa

    if split == "train":
        q, a, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        q, a, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise DataError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    return q, a, ids, paths, list(easy_vqa.get_answers())


class EasyVQA(VLDataset):
    """easy-vqa (PyPI, offline): 64x64 shape images with questions and 13 answers."""

    name = "easyvqa"
    task = "vqa"

    def __init__(self, *, split: str = "train", fraction: float = 1.0, seed: int = 0) -> None:
        q, a, ids, paths, answers = _easy_vqa(split)
        samples = [
            Sample(paths[i], paths[i], VQA_PROMPT.format(qq), aa, [aa])
            for qq, aa, i in zip(q, a, ids, strict=True)
        ]
        super().__init__(_subset(samples, fraction, seed), answers)


COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


class EasyVQACaptions(VLDataset):
    """Captions derived from easy-vqa's annotations: its questions state each image's colour and
    shape ("what color is the shape?" -> red, "what shape is in the image?" -> circle), giving
    one caption per image, e.g. "a red circle"."""

    name = "easyvqa_captions"
    task = "caption"

    def __init__(
        self,
        *,
        split: str = "train",
        fraction: float = 1.0,
        seed: int = 0,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        q, a, ids, paths, _ = _easy_vqa(split)
        color: dict[int, str] = {}
        shape: dict[int, str] = {}
        for qq, aa, i in zip(q, a, ids, strict=True):
            if aa in COLORS and qq.startswith("what") and "color" in qq:
                color[i] = aa
            elif aa in SHAPES and qq.startswith("what"):
                shape[i] = aa
        samples = []
        for i in sorted(set(color) & set(shape)):
            cap = f"a {color[i]} {shape[i]}"
            samples.append(Sample(paths[i], paths[i], prompt, cap, [cap]))
        super().__init__(_subset(samples, fraction, seed))


class Mixture(VLDataset):
    """Several datasets as one (their samples concatenated): ``"easyvqa+easyvqa_captions"``."""

    name = "mixture"
    task = "mixed"

    def __init__(self, parts: list[VLDataset]) -> None:
        samples = [s for p in parts for s in p.samples]
        lists = [p.answer_list for p in parts if p.answer_list]
        super().__init__(samples, lists[0] if lists else None)
        self.parts = parts

    def image(self, i: int) -> Tensor:
        for p in self.parts:
            if i < len(p):
                return p.image(i)
            i -= len(p)
        raise IndexError(i)


def build_dataset(registry, spec: str, split: str, **options: Any) -> VLDataset:
    """One registered reader, or several joined with ``+`` (a :class:`Mixture`); options go to
    every reader."""
    names = [n.strip() for n in spec.split("+")]
    parts = [registry.get(n)(split=split, **options) for n in names]
    return parts[0] if len(parts) == 1 else Mixture(parts)


BUILTIN_DATASETS = (
    CocoCaptions,
    VQAv2,
    ImageFolderCaptions,
    WebDatasetCaptions,
    EasyVQA,
    EasyVQACaptions,
)


@hookimpl
def register_datasets(register) -> None:
    for cls in BUILTIN_DATASETS:
        register(cls)
