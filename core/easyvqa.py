"""easy-vqa (a PyPI package of 64x64 shape images with questions): the offline dataset."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

PROMPT = "question: {} answer:"


class EasyVQA(Dataset):
    """``(image (3, 64, 64) float in [0, 1], prompt, answer)`` items of one split; images are
    read once and kept as uint8."""

    def __init__(self, split: str = "train", fraction: float = 1.0, seed: int = 0) -> None:
        import easy_vqa

        if split not in ("train", "test"):
            raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
        if split == "train":
            questions, answers, ids = easy_vqa.get_train_questions()
            paths = easy_vqa.get_train_image_paths()
        else:
            questions, answers, ids = easy_vqa.get_test_questions()
            paths = easy_vqa.get_test_image_paths()
        order = np.random.default_rng(seed).permutation(len(questions))[
            : max(1, int(len(questions) * fraction))
        ]
        self.questions = [questions[i] for i in order]
        self.answers = [answers[i] for i in order]
        self.image_ids = [ids[i] for i in order]
        self.answer_list: list[str] = list(easy_vqa.get_answers())
        used = sorted(set(self.image_ids))
        self._row = {img: r for r, img in enumerate(used)}
        self.images = torch.from_numpy(
            np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in used])
        ).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.questions)

    def image(self, i: int) -> Tensor:
        return self.images[self._row[self.image_ids[i]]].float() / 255

    def __getitem__(self, i: int) -> tuple[Tensor, str, str]:
        return self.image(i), PROMPT.format(self.questions[i]), self.answers[i]
