"""BLIP's CapFilt as a command: caption web images, filter web and synthetic captions with ITM.

``prismkit capfilt web.jsonl --captioner cap.safetensors --filter filt.safetensors --out new.jsonl``
reads ``{"image": path, "caption": web caption}`` lines, samples one synthetic caption per image
(nucleus sampling), keeps the web and synthetic captions whose ITM match probability under the
filter reaches ``--threshold``, appends optional human pairs, and writes
``{"image", "caption", "source": "web"|"synthetic"|"human", "itm_score"}`` lines atomically.

``--rounds N`` repeats caption + filter on the previous round's output with the same two models:
each round adds one new synthetic caption per image (duplicates dropped); re-scoring kept captions
with the same filter keeps them. BLIP's next step, fine-tuning the captioner and the filter on the
new data, is a training run (``prismkit train``) and is not done here.

``prismkit retrieval CKPT data.jsonl`` prints R@1/5/10 of a ``blip`` checkpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from prismkit.core.checkpoint import load_checkpoint
from prismkit.core.data import CAPTION_PROMPT, DataError
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.core.language.decoder import TextDecoder


# -- nucleus sampling --------------------------------------------------------------------------
def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``(B, V)`` logits with every token outside the nucleus set to -inf: the smallest set of
    most likely tokens whose probability reaches ``top_p`` (the top token is always kept)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
    drop_sorted = before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def nucleus_sample(
    decoder: TextDecoder,
    vision: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    eos: int,
    top_p: float = 0.9,
    max_length: int = 20,
    min_length: int = 5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample after left-padded prompts ``input_ids (B, P)`` attending to ``vision (B, Nv, D)``,
    reusing the decoder's key/value cache (as :func:`prismkit.core.generation.beam_search`).

    ``max_length`` new tokens at most, EOS included (the last step can only be EOS);
    ``min_length`` tokens before EOS may be sampled. Returns token ids without EOS.
    """
    if not 0 <= min_length < max_length:
        raise ValueError(
            f"need 0 <= min_length < max_length (max counts the EOS); got {min_length}, {max_length}"
        )
    b = input_ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = input_ids.new_zeros(b, 0)
    hidden, cache = decoder(input_ids, vision, attention_mask)
    for step in range(max_length):
        logits = decoder.logits(hidden[:, -1]).float() / temperature
        if step < min_length:
            logits[:, eos] = float("-inf")
        if step == max_length - 1:
            logits[:, :eos] = float("-inf")
            logits[:, eos + 1 :] = float("-inf")
            logits[:, eos] = 0.0
        probs = top_p_filter(logits, top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        token = token.masked_fill(done, eos)
        out = torch.cat([out, token[:, None]], dim=1)
        step_mask = (~done).long()[:, None]  # finished rows feed masked tokens
        done = done | (token == eos)
        if bool(done.all()):
            break
        hidden, cache = decoder(token[:, None], None, step_mask, cache=cache)
    result = []
    for row in out.tolist():
        result.append(row[: row.index(eos)] if eos in row else row)
    return result


# -- CapFilt -----------------------------------------------------------------------------------
@dataclass
class Pair:
    # image file path
    image: str
    # caption text
    caption: str
    # "web", "synthetic" or "human"
    source: str
    # filter's ITM match probability (None: not scored, human pairs)
    itm_score: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "image": self.image,
                "caption": self.caption,
                "source": self.source,
                "itm_score": self.itm_score,
            }
        )


def read_pairs(path: str | Path, source: str, image_root: str | Path | None = None) -> list[Pair]:
    """JSONL ``{"image": path, "caption": str}`` lines (optional ``"source"``) -> pairs; relative
    image paths are read against ``image_root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise DataError(f"{path}:{n}: each line needs 'image' and 'caption' fields")
        image = Path(item["image"])
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise DataError(f"{path}:{n}: image {image} does not exist")
        pairs.append(Pair(str(image), str(item["caption"]), item.get("source", source)))
    if not pairs:
        raise DataError(f"{path} holds no pairs")
    return pairs


class _Models:
    """A loaded checkpoint with its processor and expert feeder."""

    def __init__(self, path: str | Path, host: PluginHost) -> None:
        from prismkit.core.processor import Processor
        from prismkit.labels.feeder import ExpertFeeder

        self.model = load_checkpoint(path, host).eval()
        self.processor = Processor.from_config(self.model.config)
        self.feeder = ExpertFeeder(self.model, host, compute_missing=True)
        self.device = next(self.model.parameters()).device

    def vision(self, images: Sequence[str]) -> Tensor:
        pixels = self.processor.images(images).to(self.device)
        return self.model.encode_image(pixels, self.feeder(pixels, list(images)))


@torch.no_grad()
def caption_images(
    captioner: _Models,
    images: Sequence[str],
    prompt: str,
    top_p: float,
    max_length: int,
    min_length: int,
    generator: torch.Generator,
    batch_size: int,
) -> list[str]:
    """One nucleus-sampled caption per image (the prompt is not part of the caption)."""
    out: list[str] = []
    p = captioner.processor
    for i in range(0, len(images), batch_size):
        chunk = list(images[i : i + batch_size])
        vision = captioner.vision(chunk)
        enc = {k: v.to(vision.device) for k, v in p.prompts([prompt] * len(chunk)).items()}
        ids = nucleus_sample(
            captioner.model.language,
            vision,
            enc["input_ids"],
            enc["attention_mask"],
            p.eos,
            top_p,
            max_length,
            min_length,
            generator=generator,
        )
        out += [p.decode(row) for row in ids]
    return out


@torch.no_grad()
def itm_scores(filt: _Models, pairs: Sequence[Pair], batch_size: int) -> list[float]:
    """The filter's ITM match probability of each pair."""
    from prismkit.blip.objective import BLIPObjective

    objective = filt.model.objective
    if not isinstance(objective, BLIPObjective):
        raise ValueError(
            f"the filter must be a 'blip' checkpoint (it has an ITM head); got head {filt.model.config.head!r}"
        )
    scores: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        vision = filt.vision([q.image for q in chunk])
        enc = filt.processor.encode([""] * len(chunk), [q.caption for q in chunk])
        logits = objective.itm_logits(
            filt.model,
            enc["input_ids"].to(vision.device),
            enc["attention_mask"].to(vision.device),
            vision,
        )
        scores += logits.softmax(-1)[:, 1].tolist()
    return scores


def capfilt_round(
    pairs: list[Pair],
    captioner: _Models,
    filt: _Models,
    threshold: float = 0.5,
    prompt: str = CAPTION_PROMPT,
    top_p: float = 0.9,
    max_length: int = 20,
    min_length: int = 5,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[list[Pair], Counter]:
    """Caption every image once, score web/synthetic captions, keep those ``>= threshold``.
    Returns the kept pairs and counts ``{("web"|"synthetic", "kept"|"dropped"): n}``."""
    generator = generator or torch.Generator().manual_seed(0)
    images = list(dict.fromkeys(q.image for q in pairs))
    synthetic = caption_images(
        captioner, images, prompt, top_p, max_length, min_length, generator, batch_size
    )
    counts: Counter = Counter()
    seen = {(q.image, q.caption) for q in pairs}
    candidates = [Pair(q.image, q.caption, q.source) for q in pairs]
    for image, cap in zip(images, synthetic, strict=True):
        if not cap or (image, cap) in seen:
            counts["synthetic", "dropped"] += 1  # empty or already present
            continue
        seen.add((image, cap))
        candidates.append(Pair(image, cap, "synthetic"))
    kept = []
    for q, s in zip(candidates, itm_scores(filt, candidates, batch_size), strict=True):
        q.itm_score = round(float(s), 6)
        ok = s >= threshold
        counts[q.source, "kept" if ok else "dropped"] += 1
        if ok:
            kept.append(q)
    return kept, counts


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> None:
    """JSONL, written atomically."""
    text = "".join(q.to_json() + "\n" for q in pairs)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def capfilt(
    data: str | Path,
    captioner: str | Path,
    filt: str | Path,
    out: str | Path,
    host: PluginHost | None = None,
    human: str | Path | None = None,
    rounds: int = 1,
    threshold: float = 0.5,
    prompt: str = CAPTION_PROMPT,
    top_p: float = 0.9,
    max_length: int = 20,
    min_length: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    image_root: str | Path | None = None,
) -> list[Counter]:
    """Run ``rounds`` CapFilt rounds on ``data`` and write ``out`` (+ human pairs, unfiltered).
    Returns the per-round counts."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    host = host or get_plugin_manager()
    pairs = read_pairs(data, "web", image_root)
    human_pairs = read_pairs(human, "human", image_root) if human else []
    cap_models, filt_models = _Models(captioner, host), _Models(filt, host)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(rounds):
        pairs, counts = capfilt_round(
            pairs,
            cap_models,
            filt_models,
            threshold,
            prompt,
            top_p,
            max_length,
            min_length,
            batch_size,
            generator,
        )
        history.append(counts)
    write_pairs(out, pairs + [Pair(q.image, q.caption, "human") for q in human_pairs])
    return history


def summary(history: Sequence[Counter], human: int = 0) -> str:
    lines = [f"{'round':<7}{'source':<11}{'kept':>7}{'dropped':>9}"]
    for r, counts in enumerate(history, 1):
        for source in ("web", "synthetic"):
            lines.append(
                f"{r:<7}{source:<11}{counts[source, 'kept']:>7}{counts[source, 'dropped']:>9}"
            )
    if human:
        lines.append(f"{'':<7}{'human':<11}{human:>7}{0:>9}")
    return "\n".join(lines)
