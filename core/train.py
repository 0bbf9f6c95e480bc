"""A short training run of a model config on easy-vqa, readable top to bottom (nanoGPT style).

Defaults below; every one is a ``prismkit train`` flag.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prismkit.core.checkpoint import save_checkpoint
from prismkit.core.config import ModelConfig
from prismkit.core.easyvqa import EasyVQA
from prismkit.core.generation import score_candidates
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.model import PrismerModel, create_model
from prismkit.core.processor import Processor
from prismkit.experts.base import Expert, LabelMap


@dataclass
class TrainConfig:
    # optimisation steps
    steps: int = 300
    # images per step
    batch_size: int = 32
    # peak learning rate (AdamW)
    lr: float = 3e-4
    # AdamW weight decay on matrices (not on norms, biases, embeddings)
    weight_decay: float = 0.05
    # linear warm-up steps, then cosine decay to 10% of lr
    warmup: int = 30
    # gradient clipping (max global norm)
    clip: float = 1.0
    # fraction of the training questions used
    fraction: float = 1.0
    # test questions evaluated at the end (0 = none)
    eval_questions: int = 500
    # random seed
    seed: int = 0
    # print every this many steps
    log_every: int = 25
    # where the checkpoint and log go
    out_dir: str = "runs/default"


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def configure_optimizer(model: PrismerModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: decay on matrices, none on vectors/embeddings."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def expert_labels(experts: dict[str, Expert], images: torch.Tensor) -> dict[str, LabelMap]:
    """Run experts on a batch in dependency order (each sees the labels it ``requires``)."""
    out: dict[str, LabelMap] = {}
    pending = list(experts.values())
    while pending:
        ready = [e for e in pending if all(r in out for r in e.requires)]
        if not ready:
            raise ValueError(
                f"experts {[e.name for e in pending]} require experts that are not enabled"
            )
        for e in ready:
            out[e.name] = e.check_output(e.predict(images, {r: out[r] for r in e.requires}), images)
            pending.remove(e)
    return out


def dense_inputs(experts: dict[str, Expert], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs of dense experts. Semantic experts need a label-embedding table, which this
    short run does not build: they are refused by name."""
    semantic = [n for n, e in experts.items() if e.kind == "semantic"]
    if semantic:
        raise ValueError(
            f"expert(s) {semantic} are semantic: `prismkit train` supports dense experts only so far"
        )
    return {n: m.values for n, m in expert_labels(experts, images).items()}


def train(model_cfg: ModelConfig, cfg: TrainConfig, host: PluginHost | None = None) -> dict:
    host = host or get_plugin_manager()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = create_model(model_cfg, host)
    processor = Processor.from_config(model_cfg)
    experts = {n: host.expert(n)() for n in model_cfg.experts}
    data = EasyVQA("train", cfg.fraction, cfg.seed)
    size = model_cfg.vision.image_size
    counts = model.parameter_counts()
    print(
        f"model {model_cfg.name}: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen parameters; "
        f"{len(data)} training questions; built in {time.time() - t0:.1f}s"
    )
    opt = configure_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    log, t_train = [], time.time()
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen).tolist()
        items = [data[i] for i in idx]
        images = F.interpolate(
            torch.stack([it[0] for it in items]),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )
        batch = processor.encode([it[1] for it in items], [it[2] for it in items])
        with torch.no_grad():
            labels = dense_inputs(experts, images)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = model(
            images, batch["input_ids"], batch["attention_mask"], batch["labels"], experts=labels
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
        opt.step()
        log.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {log[-1]['lr']:.2e}  {time.time() - t_train:.0f}s",
                flush=True,
            )
    train_s = time.time() - t_train
    ckpt = out_dir / "model.safetensors"
    save_checkpoint(model, ckpt, host, extra={"train": asdict(cfg), "final_loss": log[-1]["loss"]})
    result = {
        "model": model_cfg.name,
        "checkpoint": str(ckpt),
        "train_seconds": round(train_s, 1),
        "first_loss": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        **counts,
    }
    if cfg.eval_questions:
        result["vqa_accuracy"] = evaluate_vqa(
            model, processor, experts, cfg.eval_questions, cfg.seed
        )
        print(
            f"test VQA accuracy (closed-set ranking, {cfg.eval_questions} questions): {result['vqa_accuracy']:.3f}"
        )
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def evaluate_vqa(
    model: PrismerModel,
    processor: Processor,
    experts: dict,
    n: int,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Accuracy of ranking easy-vqa's answer list by mean log-likelihood on ``n`` test questions."""
    model.eval()
    data = EasyVQA("test", 1.0, seed)
    n = min(n, len(data))
    size = model.config.vision.image_size
    cands = processor.candidates(data.answer_list)
    correct = 0
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        images = F.interpolate(
            torch.stack([it[0] for it in items]),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )
        vision = model.encode_image(images, dense_inputs(experts, images))
        p = processor.prompts([it[1] for it in items])
        scores = score_candidates(
            model.language, vision, p["input_ids"], p["attention_mask"], cands, processor.pad
        )
        pred = scores.argmax(-1).tolist()
        correct += sum(data.answer_list[j] == it[2] for j, it in zip(pred, items, strict=True))
    model.train()
    return correct / n
