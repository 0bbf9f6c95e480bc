"""easy-vqa (PyPI, offline): shape images with questions, and captions derived from them."""

from __future__ import annotations

from prismkit.core.data import CAPTION_PROMPT, VQA_PROMPT, DataError, Sample, VLDataset, _subset


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


COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def question_type(question: str, answer: str) -> str:
    """easy-vqa's four kinds of question: "shape" and "color" (what ...?), "yes_no_shape" ("is
    there a circle?") and "yes_no_color" ("is there a red shape?")."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    words = set(question.rstrip("?").split())
    return "yes_no_color" if words & set(COLORS) else "yes_no_shape"


class EasyVQA(VLDataset):
    """easy-vqa (PyPI, offline): 64x64 shape images with questions and 13 answers; each sample's
    ``question_type`` is one of :func:`question_type`'s four."""

    name = "easyvqa"
    task = "vqa"

    def __init__(self, *, split: str = "train", fraction: float = 1.0, seed: int = 0) -> None:
        q, a, ids, paths, answers = _easy_vqa(split)
        samples = [
            Sample(
                paths[i],
                paths[i],
                VQA_PROMPT.format(qq),
                aa,
                [aa],
                task="vqa",
                question_type=question_type(qq, aa),
            )
            for qq, aa, i in zip(q, a, ids, strict=True)
        ]
        super().__init__(_subset(samples, fraction, seed), answers)


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
