"""The dataset contract: what a reader yields (``Sample``), the reader base class and mixtures.

Readers are plugins (``register_datasets``); the built-in ones live in ``prismkit.datasets``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from prismkit.core.processor import load_image

CAPTION_PROMPT = "A picture of"
VQA_PROMPT = "{}"
TASKS = ("caption", "vqa")


class DataError(ValueError):
    """A dataset file or sample is wrong; the message names the file and field (and, for
    several bad samples, lists each by file and index)."""


class Problems:
    """What is wrong with a dataset's entries, collected so that all are reported at once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def __bool__(self) -> bool:
        return bool(self.items)

    def check(self) -> None:
        """Raise a ``DataError`` listing every problem (one per line), if there is any."""
        if self.items:
            lines = "\n".join(f"  {m}" for m in self.items)
            raise DataError(
                f"{len(self.items)} bad entr{'y' if len(self.items) == 1 else 'ies'} in {self.what}:\n{lines}"
            )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_object(item: Any, where: str, problems: Problems | None = None) -> dict | None:
    """``item`` if it is a JSON object; otherwise a problem naming ``where`` (or a
    ``DataError`` without a collector) and ``None``."""
    if isinstance(item, dict):
        return item
    message = f"{where}: expected an object, got {type(item).__name__} {_shown(item)}"
    if problems is None:
        raise DataError(message)
    problems.add(message)
    return None


def entry(
    item: dict,
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    problems: Problems | None = None,
    default: Any = ...,
) -> Any:
    """``item[key]``, checked: a missing key or a value of another type is a problem naming
    ``where`` (file and index) and the key. Returns ``None`` after recording a problem (or raises
    ``DataError`` when no ``problems`` collector is given); ``default`` makes the key optional."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = " or ".join(
        {int: "a number", float: "a number", str: "a string", list: "a list"}.get(k, k.__name__)
        for k in kinds
    )
    if key not in item:
        if default is not ...:
            return default
        message = f"{where}: missing key {key!r}"
    elif not isinstance(item[key], kinds) or (isinstance(item[key], bool) and bool not in kinds):
        value = item[key]
        message = f"{where}: {key!r} must be {names}, got {type(value).__name__} {_shown(value)}"
    else:
        return item[key]
    if problems is None:
        raise DataError(message)
    problems.add(message)
    return None


@dataclass
class Sample:
    # the image as a file path (label-store key) or an already decoded (3, H, W) tensor in [0, 1];
    # None: a text-only sample (trained by heads that declare ``text_only``)
    image: str | Tensor | None
    # a stable id of the image (file path or dataset key) for labels and evaluation
    image_id: str
    # text the model is conditioned on (masked from the loss)
    prompt: str
    # text the model learns to produce
    target: str
    # VQA: every annotator answer (for the official accuracy); captioning: all references
    references: list[str] = field(default_factory=list)
    # where the sample comes from, for error messages: "file entry[index]" or "file line N"
    source: str = ""
    # "caption": prompt + target is one text; "vqa": prompt is a question, target its answer
    task: str = "caption"
    # weight of the sample's loss (Prismer weights VQA answers; Visual Genome's get 0.2)
    weight: float = 1.0
    # a group for per-type metrics (VQAv2's answer_type "yes/no" / "number" / "other";
    # easy-vqa's "shape", "color", "yes/no shape", "yes/no color"); "" = none
    question_type: str = ""
    # per-sample tensors the training loop stacks and hands to the head as keyword arguments
    # (mu-VLA's retrieval embeddings); every sample of a reader carries the same keys
    extras: dict[str, Any] = field(default_factory=dict)


def image_index(image_id: str) -> int:
    """A stable int64 id of an image id string (blake2b; the same in every process and run):
    the ``image_idx`` an objective compares to find captions of the same image (BLIP's
    retrieval positives: COCO has five captions per image)."""
    digest = hashlib.blake2b(image_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) & 0x7FFF_FFFF_FFFF_FFFF


def label_key(sample: Sample) -> str:
    """The label-store key of a sample's image: its file path (the store hashes the bytes)."""
    return sample.image if isinstance(sample.image, str) else sample.image_id


class VLDataset(Dataset):
    """Base of the readers: a list of samples plus what the task needs."""

    name: ClassVar[str]
    # "caption", "vqa" or "text" (text-only samples, not evaluated)
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
        if img is None:
            raise DataError(f"dataset {self.name!r} sample {i} is text-only: it has no image")
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


def _check_image(path: Path, where: str, problems: Problems | None = None) -> str:
    """``str(path)``; a missing file is a problem naming ``where`` (file and index) and the path."""
    if not path.is_file():
        message = f"{where}: names image {path}, which does not exist"
        if problems is None:
            raise DataError(message)
        problems.add(message)
    return str(path)


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
    every reader. An option a reader does not take, or a required one missing, is a
    ``DataError`` naming the reader and its options."""
    names = [n.strip() for n in spec.split("+")]
    parts = []
    for n in names:
        cls = registry.get(n)
        _check_options(cls, n, options)
        parts.append(cls(split=split, **options))
    return parts[0] if len(parts) == 1 else Mixture(parts)


def _check_options(cls: type, name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("split", "self")]
    unknown = sorted(set(options) - set(params))
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.name not in options
    ]
    if unknown or missing:
        what = "; ".join(
            x
            for x in (
                f"unknown option(s) {unknown}" if unknown else "",
                f"missing option(s) {missing}" if missing else "",
            )
            if x
        )
        raise DataError(
            f"dataset {name!r}: {what}; it takes {accepted}: set them with "
            f"--set 'data.options={{{', '.join(f'{m}=...' for m in (missing or accepted[:2]))}}}'"
        )
