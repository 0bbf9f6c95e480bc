"""The dataset contract: what a reader yields (``Sample``), the reader base class and mixtures.

Readers are plugins (``register_datasets``); the built-in ones live in ``prismkit.datasets``.
"""

from __future__ import annotations

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
    # "caption": prompt + target is one text; "vqa": prompt is a question, target its answer
    task: str = "caption"
    # weight of the sample's loss (Prismer weights VQA answers; Visual Genome's get 0.2)
    weight: float = 1.0
    # a group for per-type metrics (VQAv2's answer_type "yes/no" / "number" / "other";
    # easy-vqa's "shape", "color", "yes/no shape", "yes/no color"); "" = none
    question_type: str = ""


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
