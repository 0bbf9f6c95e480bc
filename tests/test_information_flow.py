"""Information flow, end to end: what only an expert's label map knows reaches the answer.

A synthetic VQA task whose answer is a keyed hash of each image's pixels: no model can read it
from the RGB image (it is a pseudo-random function of every pixel), but the ``secret`` expert
plugin computes it and draws it into its label map (left half lit for "yes", right half for
"no"). The expert runs in the real label pipeline (``run_experts`` into a ``LabelStore``), and
both variants train through the real loop (``engine.train.train``) on the same data and budget:

- Prismer with that expert must answer held-out images' questions (>= 95%): the labels travel
  label store -> feeder -> expert stem -> resampler -> vision backbone -> decoder
  cross-attention -> the answer's logits;
- PrismerZ (the same model without the expert) must stay at chance on them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from helpers import TestPlugin, tiny_config
from PIL import Image

from prismkit import hookimpl
from prismkit.core.data import Sample, VLDataset
from prismkit.core.expert import Expert, LabelMap
from prismkit.core.host import get_plugin_manager
from prismkit.engine.train import DataConfig, EvalConfig, RunConfig, TrainConfig, train
from prismkit.labels.runner import list_images, run_experts
from prismkit.labels.store import LabelStore

SIZE = 32
QUESTION = "is there a shape in the image?"


def secret_bit(pixels: np.ndarray) -> int:
    """The answer hidden in an image: one bit of a hash of its uint8 pixels ``(H, W, 3)``."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).digest()[0] & 1


class SecretExpert(Expert):
    """Recovers each image's secret bit and draws it: the left half lit for 1, the right for 0."""

    name = "secret"
    kind = "dense"
    channels = 1

    def predict(self, images: torch.Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        b, _, h, w = images.shape
        out = torch.zeros(b, 1, h, w)
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i in range(b):
            if secret_bit(pixels[i]):
                out[i, :, :, : w // 2] = 1
            else:
                out[i, :, :, w // 2 :] = 1
        return LabelMap(out)


class SecretVQA(VLDataset):
    """``root/{split}/*.png`` noise images, one question each; the answer is the secret."""

    name = "secret_vqa"
    task = "vqa"

    def __init__(self, *, root: str, split: str = "train", fraction: float = 1.0, seed: int = 0):
        samples = []
        for path in sorted(Path(root, split).glob("*.png")):
            bit = secret_bit(np.asarray(Image.open(path).convert("RGB")))
            answer = "yes" if bit else "no"
            samples.append(Sample(str(path), str(path), QUESTION, answer, [answer], task="vqa"))
        super().__init__(samples, ["yes", "no"])


class SecretPlugin:
    __name__ = "secret_plugin"

    @hookimpl
    def register_experts(self, register):
        register(SecretExpert)

    @hookimpl
    def register_datasets(self, register):
        register(SecretVQA)


def _images(root: Path, split: str, n: int, rng: np.random.Generator) -> None:
    """``n`` uniform-noise images, as many with each answer."""
    (root / split).mkdir(parents=True)
    counts = [0, 0]
    while sum(counts) < n:
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        bit = secret_bit(pixels)
        if counts[bit] < n // 2:
            Image.fromarray(pixels).save(root / split / f"{sum(counts):04d}.png")
            counts[bit] += 1


def test_expert_labels_reach_the_answer_and_rgb_alone_cannot(tiny_dir, tmp_path):
    host = get_plugin_manager(extra_plugins=[TestPlugin(), SecretPlugin()])
    rng = np.random.default_rng(0)
    _images(tmp_path / "data", "train", 256, rng)
    _images(tmp_path / "data", "test", 200, rng)
    # the real label pipeline: the expert runs once per image into a content-keyed store
    store = tmp_path / "labels"
    report = run_experts(
        list_images([tmp_path / "data"]),
        {"secret": SecretExpert()},
        LabelStore(store),
        batch_size=64,
        num_workers=1,
        shard=(0, 1),
        log=lambda *_: None,
    )
    assert report.computed == 456 and not report.failures

    def run(name: str, experts: list[str]) -> dict:
        cfg = tiny_config(tiny_dir, name=name, experts=experts)
        cfg.language.dropout = 0.0
        result = train(
            cfg,
            RunConfig(
                data=DataConfig(
                    dataset="secret_vqa",
                    options={"root": str(tmp_path / "data")},
                    labels=str(store),
                ),
                train=TrainConfig(
                    steps=120,
                    batch_size=16,
                    lr=2e-3,
                    warmup=10,
                    stage="finetune",
                    eval_questions=-1,
                    log_every=1000,
                    out_dir=str(tmp_path / name),
                ),
                eval=EvalConfig(beams=1, max_length=4, min_length=1),
            ),
            host,
        )
        return result["eval"]

    prismer = run("tiny", ["secret"])
    prismer_z = run("tiny_z", [])
    assert prismer["samples"] == prismer_z["samples"] == 200
    assert prismer["vqa_accuracy"] >= 0.95, prismer
    # 200 balanced held-out questions: chance is 0.5 +- 0.035 (one standard deviation)
    assert abs(prismer_z["vqa_accuracy"] - 0.5) <= 0.12, prismer_z
