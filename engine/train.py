"""The training loop: one readable function on HF accelerate (one CPU process to many GPUs).

Defaults live in the dataclasses below; a run config TOML has ``[data]``, ``[train]`` and
``[eval]`` tables, and ``--set train.lr=1e-4`` overrides any field.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prismkit.core.checkpoint import load_weights, save_checkpoint
from prismkit.core.config import ConfigError, ModelConfig, _build
from prismkit.core.data import build_dataset, label_key
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.core.model import PrismerModel, create_model
from prismkit.core.processor import Processor
from prismkit.engine.augment import AugmentConfig, augment_batch
from prismkit.engine.batching import FeatureCache, ImageCache, batch_indices, image_key
from prismkit.labels.feeder import ExpertFeeder


@dataclass
class DataConfig:
    # registered dataset reader for training
    dataset: str = "easyvqa"
    # keyword options of the reader (paths, prompt, ...)
    options: dict[str, Any] = field(default_factory=dict)
    # fraction of the training samples used (low-data runs)
    fraction: float = 1.0
    # reader for evaluation ("" = the training reader) and its split
    eval_dataset: str = ""
    eval_split: str = "test"
    # label store folder with precomputed expert labels ("" = run the experts on the fly)
    labels: str = ""
    # DataLoader worker processes
    workers: int = 0
    # augmentation of the image and every expert map together (Prismer's recipe: crop_scale
    # [0.5, 1], hflip 0.5, randaugment_ops 2, magnitude 5); off by default
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    # optimiser steps
    steps: int = 300
    # > 0: train this many epochs instead (steps = epochs x samples / global batch)
    epochs: int = 0
    # samples per process per micro-batch
    batch_size: int = 32
    # micro-batches accumulated per optimiser step
    grad_accum: int = 1
    # peak learning rate (AdamW)
    lr: float = 3e-4
    # peak learning rate of the parameters no pretrained weights initialised (cross-attention,
    # adaptors, resampler, expert stems, a vision transformer without vision.pretrained); the
    # schedule scales it as lr; unset = lr
    new_lr: float | None = None
    # AdamW weight decay on matrices (and on norms, biases, embeddings with decay_all)
    weight_decay: float = 0.05
    # decay every trainable tensor, as the reference's AdamW does
    decay_all: bool = False
    # AdamW betas (the reference: PyTorch's defaults 0.9, 0.999)
    betas: tuple[float, float] = (0.9, 0.98)
    # learning rate at the end of the cosine decay; unset = 10% of lr
    min_lr: float | None = None
    # learning rate at the start of the warm-up
    warmup_start_lr: float = 0.0
    # cosine over epochs instead of steps (the reference's pre-training)
    cosine_per_epoch: bool = False
    # linear warm-up steps, then cosine decay to 10% of lr
    warmup: int = 30
    # gradient clipping (max global norm)
    clip: float = 1.0
    # "pretrain" (both backbones frozen) or "finetune" (language model unfrozen)
    stage: str = "pretrain"
    # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32" or "bf16"
    precision: str = "auto"
    # recompute activations in the backward pass to save memory
    gradient_checkpointing: bool = False
    # keep the frozen image stem's output (a pretrained CNN trunk) per image after its first
    # use, so later epochs skip it; needs data.augment off
    cache_frozen_features: bool = False
    # most memory that cache may hold (MiB); images beyond it are recomputed every time
    feature_cache_mib: float = 4096
    # fraction of the training questions used (kept for the short CLI; same as data.fraction)
    fraction: float = 1.0
    # test samples evaluated at the end (0 = none, -1 = the whole split)
    eval_questions: int = 500
    # random seed
    seed: int = 0
    # print/log every this many steps
    log_every: int = 25
    # a prismkit checkpoint to start from (fine-tuning a pre-trained or converted model; a
    # different image size interpolates its positions); "" = the config's pretrained backbones
    init_from: str = ""
    # write a resumable checkpoint every this many steps (0 = only at the end)
    save_every: int = 0
    # where checkpoints, logs and curves go
    out_dir: str = "runs/default"


@dataclass
class EvalConfig:
    # beams, and generated length bounds (tokens, EOS included in max)
    beams: int = 3
    max_length: int = 20
    min_length: int = 8
    # rank only the top_k answers by first token before full scoring (None = all)
    top_k: int | None = None
    # VQA: also generate answers (beam search, the reference's "generate" lengths) and report
    # vqa_accuracy_open beside the closed-set ranking's vqa_accuracy
    vqa_open: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<run config>") -> RunConfig:
        return _build(cls, data, source, "")


def peak_memory_mib() -> dict[str, float]:
    """The process's peak resident memory so far (MiB) and, on CUDA, the peak allocated since the
    last ``torch.cuda.reset_peak_memory_stats``."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _release_accelerator_state(precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    precision; a single-process run (a notebook, a demo training fp32 then bf16) starts afresh."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        state = AcceleratorState()
        if state.num_processes == 1 and state.mixed_precision != precision:
            AcceleratorState._reset_state()


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int = 1) -> float:
    """Linear warm-up from ``warmup_start_lr`` to ``lr`` over ``warmup`` steps, then cosine decay
    to ``min_lr`` (default 10% of ``lr``) by the last step, or, with ``cosine_per_epoch``, by
    epoch (the reference's pre-training: the rate changes once an epoch)."""
    min_lr = 0.1 * cfg.lr if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * (step + 1) / cfg.warmup
    if cfg.cosine_per_epoch:
        epochs = max(1, math.ceil(cfg.steps / steps_per_epoch))
        progress = (step // steps_per_epoch) / epochs
    else:
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def configure_optimizer(model: PrismerModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: decay on matrices, none on vectors/embeddings; with
    ``new_lr``, the newly initialised parameters (``model.new_parameters()``) in groups of their
    own. Each group's ``lr_scale`` multiplies the scheduled rate."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    new = {id(p) for p in model.new_parameters()} if cfg.new_lr is not None else set()
    scale = {False: 1.0, True: (cfg.new_lr or cfg.lr) / cfg.lr}
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            matrix = p.dim() >= 2 and id(p) not in embeddings
            buckets.setdefault((matrix or cfg.decay_all, id(p) in new), []).append(p)
    groups = [
        {
            "params": buckets.get((decay, is_new), []),
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": scale[is_new],
        }
        for is_new in (False, True)
        for decay in (True, False)
    ]
    # fused: one kernel per parameter, no temporaries (CPU and CUDA): 42 ms vs 391 ms per step
    # for 98M fp32 parameters on 2 CPU cores
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), fused=True
    )


# -- checkpoints -------------------------------------------------------------------------------
def save_state(
    path: Path,
    model: PrismerModel,
    opt: torch.optim.Optimizer,
    step: int,
    host: PluginHost,
    run: RunConfig,
    log: list[dict],
) -> None:
    """A resumable state folder, replaced atomically: model, optimiser, RNG states, position."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(
        model, tmp / "model.safetensors", host, extra={"step": step, "run": asdict(run)}
    )
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    np_state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "log": log}))
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_state(
    path: Path, model: PrismerModel, opt: torch.optim.Optimizer
) -> tuple[int, list[dict]]:
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # interrupted between the two renames
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"no resumable state in {path}")
    load_weights(model, path / "model.safetensors")
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(
        ("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(rng["python"]), None))
    state = json.loads((path / "state.json").read_text())
    return state["step"], state["log"]


# -- the loop ----------------------------------------------------------------------------------
def train(
    model_cfg: ModelConfig,
    run: RunConfig | TrainConfig,
    host: PluginHost | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Train ``model_cfg`` as ``run`` says; returns a summary (also written to ``result.json``).

    ``stop_after`` ends the run after that many steps (as if killed) for resume tests.
    """
    from accelerate import Accelerator

    if isinstance(run, TrainConfig):
        run = RunConfig(data=DataConfig(fraction=run.fraction), train=run)
    cfg, dcfg = run.train, run.data
    host = host or get_plugin_manager()
    cuda = torch.cuda.is_available()
    precision = {"auto": "bf16" if cuda else "no", "fp32": "no", "bf16": "bf16"}[cfg.precision]
    _release_accelerator_state(precision)
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision, cpu=not cuda
    )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = create_model(model_cfg, host)
    model.freeze(cfg.stage)
    if cfg.init_from and not resume:
        load_weights(model, cfg.init_from)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    processor = Processor.from_config(model_cfg)
    data = build_dataset(
        host.datasets,
        dcfg.dataset,
        "train",
        fraction=dcfg.fraction * cfg.fraction,
        seed=cfg.seed,
        **dcfg.options,
    )
    feeder = ExpertFeeder(model, host, dcfg.labels)
    steps_per_epoch = max(
        1, len(data) // (cfg.batch_size * cfg.grad_accum * max(1, acc.num_processes))
    )
    if cfg.epochs > 0:
        cfg.steps = cfg.epochs * steps_per_epoch
    aug = dcfg.augment
    images = ImageCache(data, (aug.source_size or model_cfg.vision.image_size))
    features = None
    if cfg.cache_frozen_features:
        if aug.enabled:
            raise ConfigError(
                "train.cache_frozen_features needs data.augment off: augmented images differ at "
                "every step; turn one of them off"
            )
        if not getattr(model.objective, "accepts_stem_features", False):
            raise ConfigError(
                f"train.cache_frozen_features: head {model_cfg.head!r} does not take cached stem "
                "features; set train.cache_frozen_features = false"
            )
        features = FeatureCache(cfg.feature_cache_mib)
    opt = configure_optimizer(model, cfg)
    step, log = 0, []
    state_dir = out_dir / "last"
    if resume:
        step, log = load_state(state_dir, model, opt)
        acc.print(f"resumed from {state_dir} at step {step}")
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    counts = raw.parameter_counts()
    acc.print(
        f"model {model_cfg.name}: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen parameters; "
        f"{len(data)} training samples ({dcfg.dataset}); {acc.num_processes} process(es); built in {time.time() - t0:.1f}s"
    )
    writer = _tensorboard(out_dir) if acc.is_main_process else None
    t_train, cpu_train = time.time(), time.process_time()
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, steps_per_epoch) * g.get("lr_scale", 1.0)
        total = 0.0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, acc.process_index, acc.num_processes, cfg, len(data))
            samples = [data[i] for i in idx]
            pixels = torch.stack([images(i) for i in idx]).to(acc.device)
            batch = {k: v.to(acc.device) for k, v in processor.batch(samples).items()}
            with torch.no_grad():
                experts = feeder(pixels, [label_key(s) for s in samples])
                if aug.enabled:
                    pixels, experts = augment_batch(
                        pixels, experts, model_cfg.vision.image_size, aug
                    )
            stem_features = None
            if features is not None:
                stem_features = features(raw, [image_key(data, i) for i in idx], pixels)
            with acc.accumulate(model), acc.autocast():
                loss = model(pixels, **batch, experts=experts, stem_features=stem_features).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.clip
                    )
                opt.step()
                opt.zero_grad(set_to_none=True)
            total += loss.detach().float() / cfg.grad_accum
        mean_loss = acc.reduce(total, reduction="mean").item()
        log.append(
            {
                "step": step,
                "loss": mean_loss,
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.time() - t_train, 2),
            }
        )
        if writer is not None:
            writer.add_scalar("train/loss", mean_loss, step)
            writer.add_scalar("train/lr", log[-1]["lr"], step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            acc.print(
                f"step {step:5d}  loss {mean_loss:.4f}  lr {log[-1]['lr']:.2e}  {time.time() - t_train:.0f}s",
                flush=True,
            )
        step += 1
        if acc.is_main_process and cfg.save_every and step % cfg.save_every == 0:
            save_state(state_dir, raw, opt, step, host, run, log)
    train_s = time.time() - t_train
    result: dict[str, Any] = {
        "model": model_cfg.name,
        "steps": step,
        "train_seconds": round(train_s, 1),
        # CPU time of this process (all its threads): on a shared machine, what the work costs
        "train_cpu_seconds": round(time.process_time() - cpu_train, 1),
        **peak_memory_mib(),
        "first_loss": log[0]["loss"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "processes": acc.num_processes,
        **counts,
    }
    if features is not None:
        result["feature_cache"] = {
            "images": len(features.store),
            "mib": round(features.bytes / 2**20, 1),
            "hits": features.hits,
            "misses": features.misses,
        }
    if acc.num_processes > 1:  # DDP keeps replicas equal: check it, do not assume it
        checksum = (
            torch.stack([p.detach().double().sum() for p in raw.parameters() if p.requires_grad])
            .sum()
            .reshape(1)
        )
        sums = acc.gather(checksum.to(acc.device))
        result["ranks_in_sync"] = bool(
            torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9)
        )
    if acc.is_main_process:
        save_state(state_dir, raw, opt, step, host, run, log)
        if step >= cfg.steps:
            ckpt = out_dir / "model.safetensors"
            save_checkpoint(
                raw, ckpt, host, extra={"run": asdict(run), "final_loss": result["final_loss"]}
            )
            result["checkpoint"] = str(ckpt)
    if step >= cfg.steps and cfg.eval_questions and acc.is_main_process:
        from prismkit.engine.evaluate import evaluate_datasets

        spec = dcfg.eval_dataset or dcfg.dataset
        t_eval, cpu_eval = time.time(), time.process_time()
        with acc.autocast():  # the training's precision (bf16 autocast or fp32)
            metrics = evaluate_datasets(
                raw,
                processor,
                host,
                spec,
                dcfg.eval_split,
                dcfg.options,
                feeder,
                run.eval,
                None if cfg.eval_questions < 0 else cfg.eval_questions,
            )
        result["eval"] = metrics
        result["eval_seconds"] = round(time.time() - t_eval, 1)
        result["eval_cpu_seconds"] = round(time.process_time() - cpu_eval, 1)
        acc.print(
            "eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "samples" not in k)
        )
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float):
                    writer.add_scalar(f"eval/{k}", v, step)
    if acc.is_main_process:
        atomic_write(
            out_dir / "log.jsonl",
            lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log)),
        )
        atomic_write(
            out_dir / "result.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2))
        )
        plot_curves(log, result.get("eval", {}), out_dir / "curves.png")
        if writer is not None:
            writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; a trimmed install just skips it
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def plot_curves(log: list[dict], metrics: dict, path: Path) -> None:
    """Loss (and learning rate) against step, final metrics in the title; written atomically."""
    if not log:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(
        [r["step"] for r in log], [r["lr"] for r in log], color="tab:gray", alpha=0.5, label="lr"
    )
    ax2.set_ylabel("learning rate")
    shown = [
        f"{k} {v:.3f}"
        for k, v in metrics.items()
        if isinstance(v, float) and "samples" not in k and "vqa_accuracy/" not in k
    ]
    lines = [", ".join(shown[i : i + 2]) for i in range(0, len(shown), 2)]  # two metrics a line
    ax.set_title("\n".join(lines) or "training", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_path(path: str | Path) -> Path:
    """A run config path, or the name of a shipped recipe (``engine/recipes/NAME.toml``)."""
    p = Path(path)
    if p.suffix != ".toml" and (RECIPES / f"{p.name}.toml").is_file():
        return RECIPES / f"{p.name}.toml"
    return p


def _read_run_toml(path: str | Path) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(recipe_path(path).read_text())
    except FileNotFoundError:
        names = ", ".join(sorted(r.stem for r in RECIPES.glob("*.toml")))
        raise ConfigError(f"run config {path} does not exist (shipped recipes: {names})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"run config {path} is not valid TOML: {e}") from None


def run_model_overrides(path: str | Path | None) -> list[str]:
    """A run config's ``[model]`` table as ``a.b=value`` overrides of the model config (a recipe
    that fine-tunes at 480 px sets ``vision.image_size``)."""
    from prismkit.core.config import _toml_value

    if path is None:
        return []

    def flat(prefix: str, table: dict[str, Any]) -> list[str]:
        out = []
        for k, v in table.items():
            if isinstance(v, dict) and k != "head_options":
                out += flat(f"{prefix}{k}.", v)
            else:
                out.append(f"{prefix}{k}={_toml_value(v)}")
        return out

    return flat("", _read_run_toml(path).get("model", {}))


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A run config TOML or shipped recipe name (``[data]``, ``[train]``, ``[eval]``; its
    ``[model]`` table is read by :func:`run_model_overrides`) plus ``train.x=...`` overrides."""
    from prismkit.core.config import apply_override

    data: dict[str, Any] = {}
    if path is not None:
        data = _read_run_toml(path)
        data.pop("model", None)
    for item in overrides or []:
        apply_override(data, item, "--set")
    return RunConfig.from_dict(data, str(path or "--set"))
