"""Metrics: parity with pycocoevalcap (BLEU, CIDEr-D, PTB tokenisation) and the official VQA rules."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from prismkit.engine.metrics import (
    bleu,
    caption_scores,
    cider_d,
    java_caption_scores,
    java_metrics_missing,
    normalize_vqa_answer,
    ptb_tokenize,
    rouge_l,
    topk_accuracy,
    vqa_accuracy,
    vqa_scores,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")

_SUBJECTS = ["A man", "Two dogs", "a woman", "The little girl", "A group of people", "An old cat"]
_VERBS = ["riding", "sitting on", "standing next to", "holding", "looking at", "playing with"]
_OBJECTS = ["a surfboard", "the red bus", "a pizza", "an umbrella", "a wooden bench", "a kite"]
_PLACES = ["in the park", "on the beach", "at night", "near a building", "in a kitchen", ""]
_ENDINGS = [".", "!", " .", "", "...", "?"]


def _caption(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.3:
        text = text.replace(" ", ", ", 1)
    if rng.random() < 0.2:
        text = text.upper()
    extras = ['"vintage"', "(blurry)", "it's", "don't", "1,000", "black-and-white", "St. Louis"]
    if rng.random() < 0.4:
        text += " " + rng.choice(extras)
    return text + rng.choice(_ENDINGS)


def _caption_sets(n_images: int = 30, seed: int = 0) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Predictions with varied overlap (copy, partial, shuffled, unrelated) with 5 references."""
    rng = random.Random(seed)
    preds, refs = {}, {}
    for image_id in range(n_images):
        refs[image_id] = [_caption(rng) for _ in range(5)]
        mode = image_id % 5
        base = rng.choice(refs[image_id])
        if mode == 0:
            preds[image_id] = base
        elif mode == 1:
            words = base.split()
            preds[image_id] = " ".join(words[: max(2, len(words) // 2)])
        elif mode == 2:
            words = base.split()
            rng.shuffle(words)
            preds[image_id] = " ".join(words) + "."
        elif mode == 3:
            preds[image_id] = _caption(rng)
        else:
            preds[image_id] = "The " + " ".join(rng.choice(_OBJECTS) for _ in range(4)) + "!"
    return preds, refs


def _coco_scorers():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    return bleu_mod.Bleu(4), cider_mod.Cider()


def test_bleu_and_cider_match_pycocoevalcap_on_the_same_tokens() -> None:
    bleu_ref, cider_ref = _coco_scorers()
    preds, refs = _caption_sets()
    res = {k: [ptb_tokenize(v)] for k, v in preds.items()}
    gts = {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}
    want_bleu, want_bleu_per = bleu_ref.compute_score(gts, res, verbose=0)
    want_cider, want_cider_per = cider_ref.compute_score(gts, res)

    got_bleu, got_bleu_per = bleu({k: v[0] for k, v in res.items()}, gts)
    got_cider, got_cider_per = cider_d({k: v[0] for k, v in res.items()}, gts)
    np.testing.assert_allclose(got_bleu, want_bleu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_cider, want_cider, rtol=0, atol=1e-12)
    keys = list(gts)
    for k in range(4):
        per_id = [got_bleu_per[key][k] for key in keys]
        np.testing.assert_allclose(per_id, want_bleu_per[k], rtol=0, atol=1e-12)
    np.testing.assert_allclose([got_cider_per[key] for key in keys], want_cider_per, atol=1e-12)
    assert 0.05 < want_bleu[3] < 0.95 and 0.1 < want_cider < 5  # a non-degenerate mix


def test_rouge_l_matches_pycocoevalcap_number_for_number() -> None:
    """pycocoevalcap's Rouge (pure Python: no Java) on the same tokens, per id and the mean;
    plus its quirks: best precision and best recall taken separately over the references, and
    an empty caption counted as one empty token."""
    rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")
    preds, refs = _caption_sets(n_images=40, seed=1)
    res = {k: [ptb_tokenize(v)] for k, v in preds.items()}
    gts = {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}
    res[0] = [""]  # an empty prediction
    gts[1] = ["a b c d e f g h i j", "a"]  # precision and recall peak on different references
    res[1] = ["a b c"]
    want, want_per = rouge_mod.Rouge().compute_score(gts, res)
    got, got_per = rouge_l({k: v[0] for k, v in res.items()}, gts)
    assert got == pytest.approx(float(want), abs=1e-12)
    np.testing.assert_allclose([got_per[k] for k in gts], want_per, rtol=0, atol=1e-12)
    assert 0.1 < got < 0.95  # a non-degenerate mix
    assert got_per[0] == 0.0
    # p = max(3/3, 1/3) = 1 (1st ref), r = max(3/10, 1/1) = 1 (2nd) -> 1.0, where the best
    # per-reference F-measure would be 0.55
    assert got_per[1] == pytest.approx(1.0)


def test_java_metrics_say_what_is_missing(monkeypatch) -> None:
    """Without Java: METEOR and SPICE are named as unavailable with the fix, 'auto' evaluation
    leaves them out with a note, and asking for them is a clear error."""
    import prismkit.engine.metrics as metrics

    monkeypatch.setattr(shutil, "which", lambda name: None)
    why = java_metrics_missing()
    assert set(why) == {"METEOR", "SPICE"}
    assert "needs Java" in why["METEOR"] and "apt install default-jre-headless" in why["METEOR"]
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        java_caption_scores({1: "a dog"}, {1: ["a dog"]}, ["METEOR"])
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        caption_scores({1: "a dog"}, {1: ["a dog"]}, java=["METEOR"])
    with pytest.raises(ValueError, match="unknown Java metric"):
        java_metrics_missing(["BLEURT"])
    from prismkit.engine.evaluate import _java_metrics

    assert _java_metrics("off") == ()
    assert metrics.java_metrics_missing() and _java_metrics("auto") == ()
    with pytest.raises(ValueError, match="eval.java_metrics = 'on': METEOR needs Java"):
        _java_metrics("on")


def test_spice_without_corenlp_is_named(monkeypatch, tmp_path) -> None:
    """SPICE also needs Stanford CoreNLP, which pycocoevalcap downloads on first use: without it
    the message says where it goes and how to get it (no silent download)."""
    import importlib.util

    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")
    real = importlib.util.find_spec

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: Spec() if n == "pycocoevalcap" else real(n, *a)
    )
    why = java_metrics_missing()
    assert "METEOR" not in why
    assert (
        "stanford-corenlp-3.6.0.jar" in why["SPICE"]
        and str(tmp_path / "spice" / "lib") in why["SPICE"]
    )


@needs_java
def test_meteor_through_pycocoevalcap_java() -> None:
    """With Java: METEOR is pycocoevalcap's own jar on the PTB-tokenised captions."""
    meteor_mod = pytest.importorskip("pycocoevalcap.meteor.meteor")
    preds = {1: "A dog runs on the grass.", 2: "a green triangle"}
    refs = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["a blue square"]}
    got = caption_scores(preds, refs, java=["METEOR"])
    gts = {str(i): [ptb_tokenize(r) for r in refs[k]] for i, k in enumerate(refs)}
    res = {str(i): [ptb_tokenize(preds[k])] for i, k in enumerate(preds)}
    scorer = meteor_mod.Meteor()
    want = scorer.compute_score(gts, res)[0]
    del scorer
    assert got["METEOR"] == pytest.approx(want, abs=1e-9) and 0.05 < got["METEOR"] < 1


@needs_java
def test_caption_scores_match_pycocoevalcap_with_java_ptbtokenizer() -> None:
    bleu_ref, cider_ref = _coco_scorers()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs = _caption_sets()
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    for key in preds:
        assert ptb_tokenize(preds[key]) == res[key][0]
        assert [ptb_tokenize(r) for r in refs[key]] == gts[key]
    want_bleu, _ = bleu_ref.compute_score(gts, res, verbose=0)
    want_cider, _ = cider_ref.compute_score(gts, res)

    got = caption_scores(preds, refs)
    for k in range(4):
        assert got[f"Bleu_{k + 1}"] == pytest.approx(want_bleu[k], abs=1e-6)
    assert got["CIDEr"] == pytest.approx(float(want_cider), abs=1e-6)


_TRICKY = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs (one brown) playing in the grass!",
    "The dog's toy isn't here; it can't be, won't it? I'm sure they're gone, we'd've.",
    'A "black-and-white" photo of a cat\'s face...',
    "A man -- standing -- near 3.5 m/s sign: 1,000 people & cats [sic] {x} * 50% $5 #1",
    "U.S. flag, e.g. Mr. Smith etc. in St. Louis. A.",
    "a woman's hat, the women's room, James' car, dogs' bowls, the 1990's",
    "Hot-dog stand - pizza; pasta: wine?! yes... no.. hmm....",
    "TWO Girls/boys on a 2x4 board at 10:30 p.m. near I-95 AT&T",
    "don’t “quoted” ‘single’ em—dash en–dash",
    "the dog is ill. A cat is in the wash. Main St. at 5 p.m. Mt. Fuji",
    "Cannot gonna 'tis a dog 's toy 6'2\" tall",
    "a plain last caption",
]


@needs_java
def test_ptb_tokenize_matches_java_on_tricky_captions() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    want = PTBTokenizer().tokenize({0: [{"caption": c} for c in _TRICKY]})[0]
    assert [ptb_tokenize(c) for c in _TRICKY] == want


def test_ptb_tokenize_hand_checked() -> None:
    assert ptb_tokenize("A Man, riding a WAVE.") == "a man riding a wave"
    assert ptb_tokenize("It's a dog's toy; it isn't mine!") == "it 's a dog 's toy it is n't mine"
    assert (
        ptb_tokenize("Two cats (grey) on 1,000 mats...")
        == "two cats -lrb- grey -rrb- on 1,000 mats"
    )
    assert ptb_tokenize("A black-and-white photo at 10:30 p.m.") == (
        "a black-and-white photo at 10:30 p.m."
    )
    assert ptb_tokenize('"Hello" $5 -- ok?!') == "hello $ 5 ok ?!"


def test_caption_scores_perfect_and_validation() -> None:
    refs = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["a red bus on a street"]}
    refs[3] = ["two people eat pizza"]
    scores = caption_scores({1: "A dog runs on the grass.", 2: "a red bus on a street"}, refs)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6)  # id 3 is unpredicted: ignored
    with pytest.raises(ValueError, match="'img-7'"):
        caption_scores({"img-7": "a cat"}, {"img-8": ["a cat"]})
    with pytest.raises(ValueError, match="empty prediction for id 2"):
        caption_scores({1: "a dog", 2: "  "}, refs)
    with pytest.raises(ValueError, match="id 1"):
        caption_scores({1: "a dog"}, {1: []})


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9)])
def test_vqa_subset_average(matches: int, expected: float) -> None:
    answers = ["2"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_scores(["2"], [answers]) == [pytest.approx(expected)]


def test_vqa_full_credit_and_normalisation() -> None:
    assert vqa_scores(["yes"], [["yes"] * 4 + ["no"] * 6]) == [pytest.approx(1.0)]
    assert vqa_scores(["Two"], [["2"] * 10]) == [pytest.approx(1.0)]
    assert vqa_scores(["a dog."], [["dog"] * 10]) == [pytest.approx(1.0)]
    assert vqa_scores(["dont"], [["don't"] * 10]) == [pytest.approx(1.0)]
    assert normalize_vqa_answer("The Two Dogs!") == "2 dogs"
    assert normalize_vqa_answer("none") == "0"
    assert normalize_vqa_answer("1,000") == "1000"  # digit comma: punctuation deleted
    assert normalize_vqa_answer("black-white") == "black white"  # no space: becomes a space
    assert normalize_vqa_answer("3.5 m.") == "3.5 m"
    assert normalize_vqa_answer("  yes\t") == "yes"
    # Disagreeing annotators get the punctuation step only (official behaviour).
    assert vqa_scores(["t-shirt"], [["t-shirt"] * 3 + ["shirt"] * 7]) == [pytest.approx(0.9)]
    assert vqa_scores(["Two"], [["Two"] * 3 + ["3"] * 7]) == [pytest.approx(0.0)]
    assert vqa_scores(["Two"], [["Two"] * 3 + ["3"] * 7], normalize_answers=True) == [
        pytest.approx(0.9)
    ]


def test_vqa_accuracy_mean_and_errors() -> None:
    acc = vqa_accuracy(["2", "cat"], [["2"] * 10, ["cat"] + ["dog"] * 9])
    assert acc == pytest.approx((1.0 + 0.3) / 2)
    with pytest.raises(ValueError, match="2 answer lists"):
        vqa_accuracy(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="question 0"):
        vqa_accuracy(["a"], [[]])


def test_topk_accuracy() -> None:
    scores = np.array([[0.1, 0.9, 0.0, 0.3, 0.2, 0.5], [0.6, 0.1, 0.2, 0.3, 0.4, 0.5]])
    assert topk_accuracy(scores, [1, 1]) == {"top1": 0.5, "top5": 0.5}
    assert topk_accuracy(scores, [3, 5], topk=(1, 2, 3)) == {"top1": 0.0, "top2": 0.5, "top3": 1.0}
    ties = np.zeros((1, 3))
    assert topk_accuracy(ties, [0], topk=(1,)) == {"top1": 1.0}  # lower index wins a tie
    assert topk_accuracy(ties, [2], topk=(1,)) == {"top1": 0.0}
    with pytest.raises(ValueError, match="each k"):
        topk_accuracy(scores, [0, 1], topk=(7,))
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(scores, [0, 6])


def test_vqa_single_reference_is_exact_match() -> None:
    from prismkit.engine.metrics import vqa_accuracy

    assert vqa_accuracy(["circle", "Red", "no"], [["circle"], ["red"], ["yes"]]) == pytest.approx(
        2 / 3
    )


def test_vqa_accuracy_by_type_groups_the_official_scores():
    preds = ["yes", "red", "no", "circle", "two"]
    refs = [["yes"], ["blue"], ["no"], ["circle"], ["2"] * 10]
    types = ["yes/no", "other", "yes/no", "other", ""]
    from prismkit.engine import metrics

    by = metrics.vqa_accuracy_by_type(preds, refs, types)
    assert by == {"other": (0.5, 2), "yes/no": (1.0, 2)}  # untyped questions are left out
    with pytest.raises(ValueError, match="types"):
        metrics.vqa_accuracy_by_type(preds, refs, types[:2])


def test_easyvqa_question_types():
    from prismkit.datasets.easyvqa import EasyVQA, question_type

    assert question_type("what color is the circle?", "red") == "color"
    assert question_type("what is the blue shape?", "triangle") == "shape"
    assert question_type("is there not a red shape?", "yes") == "yes_no_color"
    assert question_type("does the image contain a circle?", "no") == "yes_no_shape"
    counts: dict[str, int] = {}
    for s in EasyVQA(split="test").samples:
        counts[s.question_type] = counts.get(s.question_type, 0) + 1
    assert sorted(counts) == ["color", "shape", "yes_no_color", "yes_no_shape"]
    assert sum(counts.values()) == 9673
