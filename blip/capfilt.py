"""BLIP's CapFilt (captioning and filtering) as one command, the paper's loop:

1. from one pre-trained BLIP checkpoint, fine-tune a captioner (LM, ``blip_caption``) and a
   filter (ITC + ITM, ``blip_retrieval``) separately on the human-annotated pairs (the engine's
   training loop; captions cleaned as BLIP's readers clean them);
2. caption every web image with the captioner by nucleus sampling (``BLIP_Decoder.generate(
   sample=True)``: top-p 0.9 after transformers' default top-k 50, repetition penalty 1.1,
   BLIP's length limits, prompt included);
3. keep the web and synthetic captions the filter's ITM head calls a match (p(match) > 0.5);
4. write the bootstrapped dataset: human pairs + kept web pairs + kept synthetic pairs.

A run whose captioner and filter are the same checkpoint is refused (CapFilt's point is two
models fine-tuned apart). Empty web captions are dropped and counted; long ones are cut as BLIP's
tokenizer cuts them (35 tokens for the filter). Re-training on the bootstrapped dataset is a
``prismkit train`` run (see ``examples/blip_capfilt_easyvqa.sh``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prismkit.blip.data import Pair, read_pairs, write_pairs
from prismkit.blip.model import BlipModel
from prismkit.blip.options import CAPTION, RETRIEVAL
from prismkit.blip.text import pre_caption
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write


@dataclass
class FineTune:
    """How the captioner and the filter are fine-tuned on the human pairs (the engine's loop)."""

    # optimizer steps of each fine-tuning run
    steps: int = 300
    # samples per step
    batch_size: int = 32
    # peak learning rate (BLIP's COCO fine-tuning: 1e-5 for ViT-B; small models need more)
    lr: float = 1e-5
    # linear warm-up steps
    warmup: int = 0
    seed: int = 0


@dataclass
class Sampling:
    """The captioner's nucleus sampling (BLIP_Decoder.generate(sample=True) defaults)."""

    top_p: float = 0.9
    # total length, the prompt's tokens included (BLIP_Decoder.generate's defaults)
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float = 1.1


@dataclass
class Report:
    human: int = 0
    web_kept: int = 0
    web_dropped: int = 0
    web_empty: int = 0
    synthetic_kept: int = 0
    synthetic_dropped: int = 0
    synthetic_empty: int = 0
    captioner: str = ""
    filter: str = ""
    threshold: float = 0.5
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{'source':<11}{'kept':>7}{'dropped':>9}{'empty':>7}"]
        rows.append(f"{'web':<11}{self.web_kept:>7}{self.web_dropped:>9}{self.web_empty:>7}")
        rows.append(
            f"{'synthetic':<11}{self.synthetic_kept:>7}{self.synthetic_dropped:>9}{self.synthetic_empty:>7}"
        )
        rows.append(f"{'human':<11}{self.human:>7}{0:>9}{0:>7}")
        return "\n".join(rows)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_same_checkpoint(captioner: str | Path, filt: str | Path) -> None:
    """CapFilt needs two models fine-tuned apart: the same file (or identical bytes) is refused."""
    a, b = Path(captioner).resolve(), Path(filt).resolve()
    if a == b or (a.is_file() and b.is_file() and _digest(a) == _digest(b)):
        raise ValueError(
            f"captioner {captioner} and filter {filt} are the same checkpoint: CapFilt fine-tunes a "
            "captioner (LM) and a filter (ITC+ITM) separately; pass --init to fine-tune both"
        )


def _task_model(path: str | Path, host: PluginHost, needs: str) -> BlipModel:
    from prismkit.core.checkpoint import load_checkpoint

    model = load_checkpoint(path, host).eval()
    if not isinstance(model, BlipModel):
        raise ValueError(
            f"{path} is not a BLIP checkpoint (architecture {model.config.architecture!r})"
        )
    if needs == "decoder" and model.text_decoder is None:
        raise ValueError(
            f"{path} has no decoder (head {model.task!r}): the captioner must be blip_caption"
        )
    if needs == "itm" and model.itm_head is None:
        raise ValueError(
            f"{path} has no ITM head (head {model.task!r}): the filter must be blip_retrieval"
        )
    return model


def _processor(model: BlipModel):
    from prismkit.core.processor import Processor

    return Processor.from_config(model.config)


@torch.no_grad()
def caption_images(
    model: BlipModel,
    processor,
    images: Sequence[str],
    sampling: Sampling,
    generator: torch.Generator,
    batch_size: int = 32,
) -> list[str]:
    """One nucleus-sampled caption per image, decoded as BLIP decodes (prompt cut off)."""
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        pixels = processor.images(images[i : i + batch_size])
        out += model.caption(
            pixels,
            processor,
            sample=True,
            generator=generator,
            top_p=sampling.top_p,
            max_length=sampling.max_length,
            min_length=sampling.min_length,
            repetition_penalty=sampling.repetition_penalty,
        )
    return out


@torch.no_grad()
def itm_scores(
    model: BlipModel, processor, pairs: Sequence[Pair], batch_size: int = 32
) -> list[float]:
    """The filter's ITM match probability of each (image, caption); captions are data: cut to
    the model's text length, never refused."""
    scores: list[float] = []
    device = model.step.device
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        pixels = model.normalize(processor.images([q.image for q in chunk]).to(device))
        enc = processor.encode([""] * len(chunk), [q.caption for q in chunk], truncate=True)
        logits = model.itm_logits(
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
            model.image_embeds(pixels),
        )
        scores += logits.float().softmax(-1)[:, 1].tolist()
    return scores


def bootstrap(
    web: list[Pair],
    captioner: BlipModel,
    filt: BlipModel,
    sampling: Sampling | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[Pair], Report]:
    """Steps 2-3: synthetic captions for the web images, then the filter on web + synthetic.
    Returns the kept pairs (web, then synthetic) and the counts."""
    sampling = sampling or Sampling()
    report = Report(threshold=threshold)
    cap_proc, filt_proc = _processor(captioner), _processor(filt)
    max_words = filt.options.max_words
    candidates: list[Pair] = []
    for q in web:
        clean = pre_caption(q.caption, max_words)
        if clean:
            candidates.append(Pair(q.image, clean, "web", q.image_id))
        else:
            report.web_empty += 1
    images: dict[str, str] = {}
    for q in web:
        images.setdefault(q.image_id, q.image)
    generator = torch.Generator().manual_seed(seed)
    synthetic = caption_images(
        captioner, cap_proc, list(images.values()), sampling, generator, batch_size
    )
    for (image_id, image), cap in zip(images.items(), synthetic, strict=True):
        clean = pre_caption(cap, max_words)
        if clean:
            candidates.append(Pair(image, clean, "synthetic", image_id))
        else:
            report.synthetic_empty += 1
    kept = []
    for q, s in zip(candidates, itm_scores(filt, filt_proc, candidates, batch_size), strict=True):
        q.itm_score = round(float(s), 6)
        ok = s > threshold
        attr = f"{q.source}_{'kept' if ok else 'dropped'}"
        setattr(report, attr, getattr(report, attr) + 1)
        if ok:
            kept.append(q)
    return kept, report


def fine_tune(
    init: str | Path,
    task: str,
    human: str | Path,
    out_dir: Path,
    host: PluginHost,
    ft: FineTune,
    image_root: str | Path | None = None,
) -> Path:
    """Step 1 for one model: re-head the pre-trained checkpoint to ``task`` (as BLIP's
    ``load_checkpoint`` does), then the engine's training loop on the human pairs. Returns the
    fine-tuned checkpoint."""
    from prismkit.blip.convert import rehead
    from prismkit.core.checkpoint import load_checkpoint, save_checkpoint
    from prismkit.core.model import create_model
    from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train

    source = load_checkpoint(init, host)
    if not isinstance(source, BlipModel):
        raise ValueError(f"--init {init} is not a BLIP checkpoint")
    config, state = rehead(source, task)
    model = create_model(config, host, pretrained=False)
    from prismkit.blip.convert import load_converted

    load_converted(model, state, str(init))
    start = out_dir / f"{task}_init.safetensors"
    save_checkpoint(model, start, host, extra={"reheaded_from": str(init)})
    options = {"train": str(human), "max_words": source.options.max_words}
    if image_root is not None:
        options["image_root"] = str(image_root)
    run = RunConfig(
        data=DataConfig(dataset="blip_pairs", options=options),
        train=TrainConfig(
            steps=ft.steps,
            batch_size=ft.batch_size,
            lr=ft.lr,
            warmup=ft.warmup,
            seed=ft.seed,
            stage="finetune",
            eval_questions=0,
            log_every=max(1, ft.steps // 10),
            out_dir=str(out_dir / task),
            init_from=str(start),
        ),
    )
    result = train(config, run, host)
    return Path(result["checkpoint"])


def capfilt(
    web: str | Path,
    out_dir: str | Path,
    host: PluginHost | None = None,
    *,
    human: str | Path | None = None,
    init: str | Path | None = None,
    captioner: str | Path | None = None,
    filt: str | Path | None = None,
    ft: FineTune | None = None,
    sampling: Sampling | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    image_root: str | Path | None = None,
) -> Report:
    """The whole loop; writes ``out_dir/bootstrapped.jsonl`` and ``out_dir/capfilt.json``.
    Either ``init`` (fine-tune both models on ``human``) or both ``captioner`` and ``filt``
    (already fine-tuned) must be given."""
    host = host or get_plugin_manager()
    out_dir = Path(out_dir)
    result = out_dir / "bootstrapped.jsonl"
    if result.exists():
        raise FileExistsError(f"{result} exists: prismkit does not overwrite; choose another --out")
    if init is None and (captioner is None or filt is None):
        raise ValueError(
            "pass --init (fine-tune a captioner and a filter) or both --captioner and --filter"
        )
    if init is not None and human is None:
        raise ValueError("--init fine-tunes on the human-annotated pairs: pass --human")
    human_pairs = read_pairs(human, "human", image_root) if human else []
    web_pairs = read_pairs(web, "web", image_root)
    if init is not None:
        for task in (CAPTION, RETRIEVAL):
            if (out_dir / task).exists():
                raise FileExistsError(f"{out_dir / task} exists: prismkit does not overwrite")
        out_dir.mkdir(parents=True, exist_ok=True)
        ft = ft or FineTune()
        captioner = captioner or fine_tune(init, CAPTION, human, out_dir, host, ft, image_root)
        filt = filt or fine_tune(init, RETRIEVAL, human, out_dir, host, ft, image_root)
    refuse_same_checkpoint(captioner, filt)
    cap_model = _task_model(captioner, host, "decoder")
    filt_model = _task_model(filt, host, "itm")
    kept, report = bootstrap(
        web_pairs, cap_model, filt_model, sampling, threshold, seed, batch_size
    )
    report.human, report.captioner, report.filter = len(human_pairs), str(captioner), str(filt)
    write_pairs(result, human_pairs + kept)
    text = json.dumps({**report.__dict__, "dataset": str(result)}, indent=2)
    atomic_write(out_dir / "capfilt.json", lambda tmp: Path(tmp).write_text(text))
    return report
