"""Evaluation metrics: COCO captions (BLEU-1..4, ROUGE-L, CIDEr-D; METEOR and SPICE through
pycocoevalcap's Java tools), VQA accuracy, top-k classification.

Pure Python + numpy re-implementations that match the reference tools number for number:

- captions: pycocoevalcap 1.2 (``PTBTokenizer`` -> ``Bleu(4)`` / ``Rouge()`` / ``Cider()``), no
  Java needed. METEOR 1.5 and SPICE 1.0 are Java programs with large models (paraphrase tables,
  Stanford CoreNLP); they are not re-implemented: :func:`java_caption_scores` runs
  pycocoevalcap's own jars when Java and pycocoevalcap are installed and says what is missing
  otherwise;
- VQA: the official ``vqaEval.py`` of GT-Vision-Lab/VQA (normalisation tables and the
  leave-one-annotator-out average), including its quirks, which are noted where they occur.

Scores are returned on the tools' own scales: BLEU and VQA accuracy in [0, 1], CIDEr-D as
pycocoevalcap reports it (papers print x100, e.g. "CIDEr 122.6" is 1.226 here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)

# --------------------------------------------------------------------------------------------
# COCO caption tokenisation (effect of pycocoevalcap's PTBTokenizer)
# --------------------------------------------------------------------------------------------

#: pycocoevalcap removes exactly these tokens after Stanford's PTBTokenizer. The tokenizer runs
#: with ``-lowerCase``, so brackets come out as ``-lrb-`` etc. and the upper-case entries below
#: never match: pycocoevalcap keeps bracket tokens, and so do we.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-"]
    + [".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

# Abbreviations that Stanford CoreNLP 3.4.1 keeps together with their period, in any case
# (checked one by one against the jar shipped with pycocoevalcap); "no." only before a number.
_ABBREVIATIONS = (
    "mr|mrs|ms|messrs|mme|mlle|drs?|profs?|sens?|reps?|attys?|govs?|st|ste|mt|ft|vs|etc|al|lt"
    "|col|gen|adm|rev|maj|sgt|cpl|pvt|capt|ave|pres|lieut|hon|brig|cmdr|comdr|pfc|spc|det|jr|sr"
    "|bros|blvd|rd|esq|ph|inc|cos?|corp|ltd|plc|dept|assn|univ|intl|sys|natl|jan|feb|mar|apr"
    "|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz|calif|colo|conn|fla"
    "|ind|kans?|ky|md|mich|minn|mont|neb|nev|okla|penn|tenn|vt|wis|wisc|wyo|tel|est|ext|sq|ga"
    "|mo|va|ct|dak"
)
# ... and those it keeps only when capitalised ("Ill." but "the dog is ill .").
_CAPITALISED_ABBREVIATIONS = (
    "|".join(
        f"{w[0].upper()}(?i:{w[1:]})" for w in ("ark", "del", "ill", "mass", "miss", "ore", "tex")
    )
    + "|W(?i:ash)|P(?i:a)|L(?i:a)|A(?i:z)"
)
_WORD_JOINERS = (
    r"[-./@]|(?<=[^\W\d_])'|'(?=(?:s|re|ve|d|m|ll)\b)|(?<=[A-Z])&(?=[A-Z])|(?<=\d)[,:](?=\d)"
)
_WORD = rf"\w+(?:(?:{_WORD_JOINERS})\w+)*"
_TOKEN_RE = re.compile(
    "|".join(
        [
            r"(?P<acronym>(?<!\w)(?:[A-Za-z]\.){2,})",  # u.s., p.m., e.g.
            rf"(?P<abbrev>(?<!\w)(?:(?i:{_ABBREVIATIONS})|{_CAPITALISED_ABBREVIATIONS})\.(?!\w))",
            r"(?P<number_abbrev>(?<!\w)(?i:no)\.(?=\s*\d))",
            r"(?P<initial>(?<!\w)[A-Za-z]\.(?!\w))",  # "A. Lincoln"
            r"(?P<special>(?<!\w)'t(?:is|was)\b|(?<!\w)'\d+s?\b|(?<!\w)[#@][A-Za-z_]\w*"
            r"|(?<!\w)'(?:s|re|ve|d|m|ll|n')(?!\w)|(?<!\w)n't\b|<\w+>)",
            rf"(?P<word>{_WORD}(?:\+\+)?)",
            r"(?P<dots>\.+|…)",
            r"(?P<marks>[?!]+)",
            r"(?P<dashes>-+|[–—])",
            r"(?P<other>\S)",
        ]
    )
)
_CLITICS = ("n't", "'s", "'re", "'ve", "'d", "'m", "'ll")
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}


def _split_word(word: str) -> list[str]:
    """Split PTB clitics off a lower-cased word: ``don't -> do n't``, ``dog's -> dog 's``."""
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return [*_split_word(word[: -len(clitic)]), clitic]  # we'd've -> we 'd 've
    return [word]


def ptb_tokenize(caption: str) -> str:
    """Tokenise one caption as pycocoevalcap's ``PTBTokenizer`` does; tokens joined by spaces.

    Lower-cases, splits punctuation and clitics the Penn Treebank way (``isn't -> is n't``,
    ``$5 -> $ 5``), keeps numbers (``1,000``, ``3.5``), hyphenated words, acronyms and known
    abbreviations whole, then drops the tokens in :data:`PTB_PUNCTUATION`.

    The reference runs Stanford CoreNLP 3.4.1 through Java; this is a regex re-implementation
    that agrees with it on ordinary captions (the test-suite compares both). Known differences,
    all on text rare in captions: ``y'all`` (PTB: ``y' all``), ``rock'n'roll`` (PTB splits it),
    unlisted abbreviations, URL rules, and a single letter + period ending the *last* caption of
    a batch (PTB sees the whole batch as one file: ``"sign A."`` keeps ``a.`` except at the very
    end of the file, where it becomes ``a``; we always keep ``a.``).
    """
    text = caption.replace("\n", " ")
    for curly, plain in (("’", "'"), ("‘", "'"), ("“", '"'), ("”", '"')):
        text = text.replace(curly, plain)
    tokens: list[str] = []
    for match in _TOKEN_RE.finditer(text):
        kind, token = match.lastgroup, match.group().lower()
        if kind == "word":
            tokens.extend(_split_word(token))
        elif kind == "special" and token.startswith("'t"):
            tokens.extend(["'t", token[2:]])  # 'tis -> 't is
        elif kind == "dots":
            tokens.extend(["..."] if len(token) > 2 or token == "…" else ["."] * len(token))
        elif kind == "marks":
            tokens.append(token)  # "?!", "!!" are kept: pycocoevalcap only drops "?" and "!"
        elif kind == "dashes":
            tokens.append("-" if token == "-" else "--")
        elif kind == "other":
            tokens.append(_BRACKETS.get(token, "''" if token == '"' else token))
        else:
            tokens.append(token)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


# --------------------------------------------------------------------------------------------
# BLEU and CIDEr-D (pycocoevalcap's bleu_scorer.py / cider_scorer.py)
# --------------------------------------------------------------------------------------------


def _ngram_counts(words: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    """Counts of all 1..n-grams, in pycocoevalcap's order (by length, then position)."""
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = tuple(words[i : i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


def _bleu_from_stats(
    correct: Sequence[float], guess: Sequence[float], test_len: float, ref_len: float
) -> list[float]:
    """BLEU-1..n with pycocoevalcap's smoothing constants and brevity penalty."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap: "so that if guess is 0 still return 0"
    scores, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess, strict=True)):
        product *= (float(c) + tiny) / (float(g) + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(
    predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], n: int = 4
) -> tuple[list[float], dict[K, list[float]]]:
    """Corpus BLEU-1..n exactly as pycocoevalcap's ``Bleu(n)`` on *tokenised* captions.

    Clipped n-gram counts are summed over the corpus; the brevity penalty uses, per caption, the
    reference length closest to the prediction's (shorter one on ties). Returns the corpus
    scores ``[BLEU-1, ..., BLEU-n]`` and per-id scores (pycocoevalcap's second output).
    """
    correct_total, guess_total = [0] * n, [0] * n
    test_total = ref_total = 0
    per_id: dict[K, list[float]] = {}
    for key, prediction in predictions.items():
        words = prediction.split()
        test_len = len(words)
        max_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in references[key]:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngram_counts(ref_words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        per_id[key] = _bleu_from_stats(correct, guess, test_len, ref_len)
        test_total += test_len
        ref_total += ref_len
        correct_total = [a + b for a, b in zip(correct_total, correct, strict=True)]
        guess_total = [a + b for a, b in zip(guess_total, guess, strict=True)]
    return _bleu_from_stats(correct_total, guess_total, test_total, ref_total), per_id


def cider_d(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[K, float]]:
    """CIDEr-D exactly as pycocoevalcap's ``Cider()`` on *tokenised* captions.

    TF-IDF n-gram vectors with document frequencies counted over the references of the
    evaluated ids (so the score depends on the evaluated set; one id alone scores 0),
    prediction weights clipped at the reference's, a gaussian penalty on the length difference
    (pycocoevalcap measures "length" as the number of bigrams), mean over n, mean over the
    references, times 10. Returns the corpus mean and per-id scores.
    """
    ref_counts = {
        key: [_ngram_counts(r.split(), n) for r in references[key]] for key in predictions
    }
    doc_freq: dict[tuple[str, ...], int] = {}
    for counts_list in ref_counts.values():
        for gram in {g for counts in counts_list for g in counts}:
            doc_freq[gram] = doc_freq.get(gram, 0) + 1
    log_n_docs = math.log(float(len(predictions)))

    def tfidf(counts: dict[tuple[str, ...], int]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        sq_norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * (log_n_docs - math.log(max(1.0, doc_freq.get(gram, 0))))
            vec[k][gram] = weight
            sq_norm[k] += weight**2
            if k == 1:  # pycocoevalcap's "length" counts bigrams, not words
                length += tf
        return vec, [math.sqrt(s) for s in sq_norm], length

    penalty_scale = 2 * sigma**2
    per_id: dict[K, float] = {}
    for key, prediction in predictions.items():
        vec, norm, length = tfidf(_ngram_counts(prediction.split(), n))
        total = [0.0] * n
        for counts in ref_counts[key]:
            vec_ref, norm_ref, length_ref = tfidf(counts)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / penalty_scale)
            for k in range(n):
                val = 0.0
                for gram, weight in vec[k].items():
                    ref_weight = vec_ref[k].get(gram, 0.0)
                    val += min(weight, ref_weight) * ref_weight
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total[k] += val * penalty
        per_id[key] = sum(total) / n / len(ref_counts[key]) * 10.0
    return float(np.mean(list(per_id.values()))), per_id


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (pycocoevalcap's ``my_lcs``)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(
    predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], beta: float = 1.2
) -> tuple[float, dict[K, float]]:
    """ROUGE-L exactly as pycocoevalcap's ``Rouge()`` on *tokenised* captions.

    Per id: the LCS with each reference gives a precision and a recall; the best precision and
    the best recall (taken separately, over the references) make an F-measure with
    ``beta = 1.2``. Tokens are split on single spaces, as the reference does (an empty caption
    is one empty token). Returns the mean over ids and per-id scores.
    """
    per_id: dict[K, float] = {}
    for key, prediction in predictions.items():
        cand = prediction.split(" ")
        prec, rec = [], []
        for ref in references[key]:
            ref_tokens = ref.split(" ")
            lcs = _lcs(ref_tokens, cand)
            prec.append(lcs / len(cand))
            rec.append(lcs / len(ref_tokens))
        p, r = max(prec), max(rec)
        per_id[key] = (1 + beta**2) * p * r / (r + beta**2 * p) if p != 0 and r != 0 else 0.0
    return float(np.mean(list(per_id.values()))), per_id


JAVA_METRICS = ("METEOR", "SPICE")


def java_metrics_missing(names: Sequence[str] = JAVA_METRICS) -> dict[str, str]:
    """Why each of ``names`` (METEOR, SPICE) cannot run here, with the fix; empty when all can."""
    import importlib.util
    import shutil

    why: dict[str, str] = {}
    java = shutil.which("java")
    spec = importlib.util.find_spec("pycocoevalcap")
    for name in names:
        if name not in JAVA_METRICS:
            raise ValueError(f"unknown Java metric {name!r}; known: {JAVA_METRICS}")
        if java is None:
            why[name] = (
                f"{name} needs Java, which is not on PATH: install a JRE (e.g. "
                f"`apt install default-jre-headless`) and `pip install pycocoevalcap`"
            )
        elif spec is None:
            why[name] = f"{name} runs pycocoevalcap's jar: `pip install pycocoevalcap`"
        elif name == "SPICE":
            lib = Path(list(spec.submodule_search_locations or [""])[0]) / "spice" / "lib"
            if not (lib / "stanford-corenlp-3.6.0.jar").is_file():
                why[name] = (
                    f"SPICE needs Stanford CoreNLP 3.6.0 in {lib} (stanford-corenlp-3.6.0.jar "
                    f"and -models.jar): run `python -m pycocoevalcap.spice.get_stanford_models` "
                    f"once with a network"
                )
    return why


def java_caption_scores(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    names: Sequence[str] = JAVA_METRICS,
) -> dict[str, float]:
    """METEOR and/or SPICE from pycocoevalcap's own Java tools, on *tokenised* captions (as
    ``COCOEvalCap`` feeds them). Raises ``RuntimeError`` saying what is missing (see
    :func:`java_metrics_missing`) when a tool cannot run here."""
    missing = java_metrics_missing(names)
    if missing:
        raise RuntimeError("; ".join(missing.values()))
    keys = list(predictions)
    ids = {key: str(i) for i, key in enumerate(keys)}  # SPICE sorts ids and writes them to JSON
    gts = {ids[k]: list(references[k]) for k in keys}
    res = {ids[k]: [predictions[k]] for k in keys}
    out: dict[str, float] = {}
    if "METEOR" in names:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ stops the Java process
    if "SPICE" in names:
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def caption_scores(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    java: Sequence[str] = (),
) -> dict[str, float]:
    """COCO caption metrics as pycocoevalcap's ``COCOEvalCap`` reports them.

    ``predictions`` maps an id to one raw caption; ``references`` maps ids to raw reference
    captions and may hold more ids than ``predictions`` (only predicted ids are scored, as
    COCOEvalCap scores the images of the results file). Both are tokenised with
    :func:`ptb_tokenize`. Returns ``Bleu_1``..``Bleu_4``, ``ROUGE_L`` and ``CIDEr`` (CIDEr-D),
    plus the Java metrics named in ``java`` (``"METEOR"``, ``"SPICE"``; see
    :func:`java_caption_scores`).

    Raises ValueError naming the id for: no predictions, an id without references, an empty
    reference list, or an empty prediction string.
    """
    if not predictions:
        raise ValueError("caption_scores: no predictions given")
    missing = [key for key in predictions if key not in references]
    if missing:
        raise ValueError(f"caption_scores: no references for id(s) {missing[:5]!r}")
    for key, caption in predictions.items():
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption_scores: empty prediction for id {key!r}: {caption!r}")
        if isinstance(references[key], str) or not references[key]:
            raise ValueError(f"caption_scores: references for id {key!r} must be a non-empty list")
    preds = {key: ptb_tokenize(caption) for key, caption in predictions.items()}
    refs = {key: [ptb_tokenize(r) for r in references[key]] for key in predictions}
    bleu_scores, _ = bleu(preds, refs, n=4)
    cider, _ = cider_d(preds, refs)
    scores = {f"Bleu_{k + 1}": s for k, s in enumerate(bleu_scores)}
    scores["ROUGE_L"] = rouge_l(preds, refs)[0]
    scores["CIDEr"] = cider
    if java:
        scores.update(java_caption_scores(preds, refs, java))
    return scores


# --------------------------------------------------------------------------------------------
# VQA accuracy (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py)
# --------------------------------------------------------------------------------------------

# The official table, verbatim, including its oddities ("somebody'd" -> "somebodyd").
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-")
VQA_PUNCTUATION += (">", "<", "@", "`", ",", "?", "!")
# "(?!<=\d)" is the official pattern's typo for a look-behind; as written it never rejects, so
# every "." not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out punctuation, strip periods."""
    out = text
    number_comma = _COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCTUATION:
        if p + " " in text or " " + p in text or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (32) in the position of ``count``.
    return _PERIOD_STRIP.sub("", out, count=32)


def _vqa_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words, articles, contractions."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise a predicted answer as the official VQA evaluation does.

    ``"Two" -> "2"``, ``"a dog." -> "dog"``, ``"dont" -> "don't"``, ``"yes!" -> "yes"``.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digit_article(_vqa_punctuation(text))


def vqa_scores(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    normalize_answers: bool = False,
) -> list[float]:
    """Per-question VQA accuracy in [0, 1], as the official ``vqaEval.py`` computes it.

    The prediction is normalised with :func:`normalize_vqa_answer`. Ground-truth answers are
    used as given (VQA annotation files are already normalised), except that when annotators
    disagree the official punctuation step is applied to them; ``normalize_answers=True``
    normalises them fully instead, for datasets whose answers are raw text. The score averages
    ``min(#matching other annotators / 3, 1)`` over every leave-one-annotator-out subset: with
    10 answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0. With a single reference
    answer (datasets with one annotator, like easy-vqa) the score is exact match.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"vqa_scores: {len(predictions)} predictions, {len(answers)} answer lists")
    scores = []
    for index, (prediction, gt_answers) in enumerate(zip(predictions, answers, strict=True)):
        if isinstance(gt_answers, str) or not gt_answers:
            raise ValueError(f"vqa_scores: question {index} needs a non-empty list of answers")
        result = normalize_vqa_answer(prediction)
        gts = list(gt_answers)
        if normalize_answers:
            gts = [normalize_vqa_answer(a) for a in gts]
        elif len(set(gts)) > 1:
            gts = [_vqa_punctuation(a) for a in gts]
        if len(gts) == 1:  # one reference answer (easy-vqa, say): the subset average is undefined
            scores.append(float(gts[0] == result))
            continue
        matches = sum(gt == result for gt in gts)
        per_subset = [min(1.0, (matches - (gt == result)) / 3) for gt in gts]
        scores.append(sum(per_subset) / len(per_subset))
    return scores


def vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], *, normalize_answers: bool = False
) -> float:
    """Mean official VQA accuracy in [0, 1] (the official tool prints x100); see :func:`vqa_scores`."""
    if not predictions:
        raise ValueError("vqa_accuracy: no predictions given")
    return float(np.mean(vqa_scores(predictions, answers, normalize_answers=normalize_answers)))


def vqa_accuracy_by_type(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    types: Sequence[str],
    *,
    normalize_answers: bool = False,
) -> dict[str, tuple[float, int]]:
    """``{type: (mean VQA accuracy, questions)}`` over the questions of each non-empty type
    (VQAv2's answer types, easy-vqa's question kinds), sorted by type name."""
    if len(types) != len(predictions):
        raise ValueError(
            f"vqa_accuracy_by_type: {len(predictions)} predictions, {len(types)} types"
        )
    scores = vqa_scores(predictions, answers, normalize_answers=normalize_answers)
    groups: dict[str, list[float]] = {}
    for t, s in zip(types, scores, strict=True):
        if t:
            groups.setdefault(t, []).append(s)
    return {t: (float(np.mean(v)), len(v)) for t, v in sorted(groups.items())}


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray | Sequence[int], topk: Iterable[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy from a score matrix.

    Args:
        scores: ``(N, C)`` class scores (higher is better, e.g. caption log-likelihoods).
        labels: ``(N,)`` true class indices in ``[0, C)``.
        topk: the k values to report; each must be ``<= C``.

    Returns ``{"top1": ..., "top5": ...}`` in [0, 1]. Ties are broken deterministically towards
    the lower class index (a stable sort).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"topk_accuracy: scores must be (N, C) with N > 0, got {scores.shape}")
    n, c = scores.shape
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"topk_accuracy: labels must be ({n},) integers, got {labels.shape}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(
            f"topk_accuracy: labels must lie in [0, {c}), got {labels.min()}..{labels.max()}"
        )
    ks = sorted(set(topk))
    if not ks or ks[0] < 1 or ks[-1] > c:
        raise ValueError(f"topk_accuracy: each k must lie in [1, {c}], got {ks}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, : ks[-1]]
    hits = order == labels[:, None]
    return {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
