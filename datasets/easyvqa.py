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
                f"easy-vqa {split} [{n}]",
                "vqa",
                question_type=question_type(qq, aa),
            )
            for n, (qq, aa, i) in enumerate(zip(q, a, ids, strict=True))
        ]
        super().__init__(_subset(samples, fraction, seed), answers)


def image_facts(question: str, answer: str) -> dict[str, str]:
    """What one question and its answer say about the image's shape and colour: the answer of a
    "what" question, the colour or shape a "what" question names ("what is the red shape?"),
    and those a yes/no question confirms ("is there a red shape?" yes, "is there not a circle?"
    no)."""
    words = set(question.rstrip("?").split())
    named = {"color": words & set(COLORS), "shape": words & set(SHAPES)}
    facts = {}
    if answer in COLORS:
        facts["color"] = answer
    elif answer in SHAPES:
        facts["shape"] = answer
    elif answer in ("yes", "no"):
        if (answer == "yes") == bool(words & {"not", "no"}):
            return {}  # a denial names what the image does not show
    else:
        return {}
    for kind, found in named.items():
        if len(found) == 1:
            facts.setdefault(kind, next(iter(found)))
    return facts


class EasyVQACaptions(VLDataset):
    """Captions derived from easy-vqa's annotations: each image's questions state or confirm its
    colour and shape ("what color is the shape?" -> red, "what is the red shape?" -> circle, "is
    there a red shape?" -> yes), giving one caption per image, e.g. "a red circle", for every
    image whose questions reveal both (3,542 of 4,000 training and 880 of 1,000 test images; the
    others are left out). A contradiction between two questions is an error naming both."""

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
        known: dict[int, dict[str, tuple[str, str]]] = {}
        for qq, aa, i in zip(q, a, ids, strict=True):
            for kind, value in image_facts(qq, aa).items():
                seen = known.setdefault(i, {}).setdefault(kind, (value, qq))
                if seen[0] != value:
                    raise DataError(
                        f"easy-vqa {split} image {i}: {seen[1]!r} gives {kind} {seen[0]} but "
                        f"{qq!r} ({aa}) gives {value}"
                    )
        samples = []
        for i in sorted(known):
            if {"color", "shape"} <= set(known[i]):
                cap = f"a {known[i]['color'][0]} {known[i]['shape'][0]}"
                samples.append(
                    Sample(paths[i], paths[i], prompt, cap, [cap], f"easy-vqa {split} image {i}")
                )
        super().__init__(_subset(samples, fraction, seed))
