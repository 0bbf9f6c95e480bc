"""The training loop: one readable function on HF accelerate (one CPU process to many GPUs).

Defaults live in the dataclasses below; a run config TOML has ``[data]``, ``[train]`` and
``[eval]`` tables, and ``--set train.lr=1e-4`` overrides any field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prismkit.core.checkpoint import load_weights, save_checkpoint
from prismkit.core.config import ConfigError, ModelConfig, _build
from prismkit.core.data import DataError, build_dataset, image_index, label_key
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.core.model import PrismerModel, create_model
from prismkit.core.preflight import require_weights
from prismkit.core.processor import Processor, drop_empty
from prismkit.engine.augment import AugmentConfig, augment_batch
from prismkit.engine.batching import FeatureCache, ImageCache, batch_indices, image_key
from prismkit.engine.stream import StreamFeed, StreamingDataset
from prismkit.engine.validate import validate_dataset
from prismkit.labels.feeder import ExpertFeeder

STAGES = ("pretrain", "finetune")
PRECISIONS = ("auto", "fp32", "bf16")
VALIDATE_MODES = ("header", "full", "off")
# what a run writes into its folder (``--overwrite`` removes these, and nothing else)
RUN_OUTPUTS = (
    "last",
    "last.tmp",
    "last.old",
    "model.safetensors",
    "log.jsonl",
    "result.json",
    "curves.png",
    "tensorboard",
)


class RunExistsError(FileExistsError):
    """The run folder already holds a run: resume it, overwrite it, or pick another folder."""


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
    # options of the evaluation reader (unset = data.options; {} = none): a streamed training
    # set and a map-style test set take different options
    eval_options: dict[str, Any] | None = None
    # label store folder with precomputed expert labels ("" = run the experts on the fly)
    labels: str = ""
    # DataLoader worker processes
    workers: int = 0
    # a text-only reader mixed into every batch ("" = none; e.g. "text_corpus") and its options;
    # needs a head that trains on text alone (``text_only``, e.g. "prefix_lm")
    text_dataset: str = ""
    text_options: dict[str, Any] = field(default_factory=dict)
    # fraction of each batch taken from text_dataset (SimVLM: 512 of 4,608 = 0.111)
    text_ratio: float = 0.0
    # augmentation of the image and every expert map together (Prismer's recipe: crop_scale
    # [0.5, 1], hflip 0.5, randaugment_ops 2, magnitude 5); off by default
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # check every sample before step 0: "header" (image headers, text lengths, labels in the
    # store), "full" (decode every image too) or "off"
    validate: str = "header"
    # streaming readers: write the sample keys each process consumed to
    # OUT_DIR/keys/rank<R>.jsonl (one line per micro-batch: step, micro, epoch, keys), to audit
    # that every sample is read once per epoch
    record_keys: bool = False


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
    # write a resumable checkpoint (OUT_DIR/last) every this many steps (0 = only at the end);
    # Ctrl-C or SIGTERM also writes one before stopping
    save_every: int = 100
    # where checkpoints, logs and curves go; "" = runs/<model config>-<date>-<time>. An existing
    # non-empty folder is refused unless resuming or overwriting
    out_dir: str = ""


@dataclass
class EvalConfig:
    # beams, and generated length bounds (tokens, EOS included in max)
    beams: int = 3
    max_length: int = 20
    min_length: int = 8
    # rank only the top_k answers by first token before full scoring (None = all)
    top_k: int | None = None
    # captions: METEOR and SPICE through pycocoevalcap's Java tools: "auto" (when Java and the
    # tools are here, else a one-line note), "on" (an error when they are not) or "off"
    java_metrics: str = "auto"
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
        run = _build(cls, data, source, "")
        run.check(source)
        return run

    def check(self, source: str = "<run config>") -> None:
        """``ConfigError`` naming the field (and its flag) and the fix for a value no run can use."""
        t, d, e = self.train, self.data, self.eval

        def need(ok: bool, where: str, rule: str, value: Any) -> None:
            if not ok:
                flag = (
                    f" (--{where.split('.', 1)[1].replace('_', '-')})"
                    if where.startswith("train.")
                    else ""
                )
                raise ConfigError(f"{source}: field {where}{flag} must be {rule}, got {value!r}")

        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            need(getattr(t, name) >= 1, f"train.{name}", "at least 1", getattr(t, name))
        for name in ("warmup", "save_every"):
            need(getattr(t, name) >= 0, f"train.{name}", "0 or more", getattr(t, name))
        need(
            t.eval_questions >= -1,
            "train.eval_questions",
            "-1 (all), 0 (none) or more",
            t.eval_questions,
        )
        need(math.isfinite(t.lr) and t.lr > 0, "train.lr", "a positive number", t.lr)
        need(t.weight_decay >= 0, "train.weight_decay", "0 or more", t.weight_decay)
        need(t.clip > 0, "train.clip", "a positive number", t.clip)
        need(t.stage in STAGES, "train.stage", f"one of {STAGES}", t.stage)
        need(t.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", t.precision)
        need(0 < t.fraction <= 1, "train.fraction", "in (0, 1]", t.fraction)
        need(0 < d.fraction <= 1, "data.fraction", "in (0, 1]", d.fraction)
        if t.fraction != 1 and d.fraction != 1:
            raise ConfigError(
                f"{source}: train.fraction ({t.fraction}) and data.fraction ({d.fraction}) are the "
                f"same setting: give one"
            )
        need(d.workers >= 0, "data.workers", "0 or more", d.workers)
        need(d.validate in VALIDATE_MODES, "data.validate", f"one of {VALIDATE_MODES}", d.validate)
        need(e.beams >= 1, "eval.beams", "at least 1", e.beams)
        need(e.max_length >= 1, "eval.max_length", "at least 1", e.max_length)
        need(
            0 <= e.min_length <= e.max_length,
            "eval.min_length",
            f"in [0, eval.max_length={e.max_length}]",
            e.min_length,
        )
        need(e.top_k is None or e.top_k >= 1, "eval.top_k", "at least 1 (or unset)", e.top_k)
        need(
            e.java_metrics in ("auto", "on", "off"),
            "eval.java_metrics",
            "auto, on or off",
            e.java_metrics,
        )


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
    extra: dict[str, Any] | None = None,
) -> None:
    """A resumable state folder, replaced atomically: model, optimiser, RNG states, position
    (``extra``: more of it, e.g. the streamed data's, kept in ``state.json``)."""
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
    (tmp / "state.json").write_text(json.dumps({"step": step, "log": log, **(extra or {})}))
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


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of a resumable state folder (``.old`` if interrupted between renames)."""
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")
    return json.loads((path / "state.json").read_text())


# -- the run folder ----------------------------------------------------------------------------
def default_out_dir(model_name: str, root: str | Path = "runs") -> Path:
    """``runs/<model config>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... if taken): each run its own."""
    base = Path(root) / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an earlier run unless asked: ``resume`` needs its state, a non-empty folder
    needs ``overwrite`` (which removes the run's own outputs, :data:`RUN_OUTPUTS`, and nothing else)."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: give one")
    if resume:
        if not any((out_dir / n / "state.json").exists() for n in ("last", "last.old")):
            raise FileNotFoundError(
                f"--resume: no resumable state in {out_dir / 'last'}: give the --out-dir of the "
                f"run to continue"
            )
        return
    taken = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if out_dir.exists() and not out_dir.is_dir():
        raise RunExistsError(f"run folder {out_dir} is a file: pick another --out-dir")
    if not taken:
        return
    if not overwrite:
        shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
        raise RunExistsError(
            f"run folder {out_dir} is not empty ({shown}): pass --resume to continue that run, "
            f"--overwrite to replace it, or another --out-dir"
        )
    for name in RUN_OUTPUTS:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class _StopRequest:
    """Ctrl-C / SIGTERM during training: the first finishes the current step, then the loop saves
    a resumable state and stops; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a resumable state "
            f"(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# -- the loop ----------------------------------------------------------------------------------
def train(
    model_cfg: ModelConfig,
    run: RunConfig | TrainConfig,
    host: PluginHost | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Train ``model_cfg`` as ``run`` says; returns a summary (also written to ``result.json``).

    The run folder (``train.out_dir``; default ``runs/<config>-<date>-<time>``) must be new or
    empty unless ``resume`` (continue from its ``last/`` state) or ``overwrite`` (replace its
    outputs). Every sample is checked before step 0 (``data.validate``); each step is appended
    to ``log.jsonl`` as it happens; a resumable state is saved every ``save_every`` steps and on
    Ctrl-C / SIGTERM (the summary then has ``"interrupted": "SIGINT"`` or ``"SIGTERM"``).
    ``stop_after`` ends the run after that many steps (as if killed) for resume tests.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    if isinstance(run, TrainConfig):
        run = RunConfig(data=DataConfig(fraction=run.fraction), train=run)
    run.check()
    cfg, dcfg = run.train, run.data
    host = host or get_plugin_manager()
    cuda = torch.cuda.is_available()
    precision = {"auto": "bf16" if cuda else "no", "fp32": "no", "bf16": "bf16"}[cfg.precision]
    _release_accelerator_state(precision)
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision, cpu=not cuda
    )
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        and acc.distributed_type.value != "FSDP"
    ):
        # accelerate 1.15 turns FSDP on only for accelerator devices (GPU, NPU, XPU, ...): on
        # CPU processes (gloo) it silently runs DDP; say so rather than pretend to shard
        acc.print(
            f"warning: FSDP was asked for (ACCELERATE_USE_FSDP) but accelerate runs "
            f"{acc.distributed_type.value} here: FSDP needs GPUs (or other accelerators); "
            f"training with full replicas",
            file=sys.stderr,
        )
    # the main process names and checks the run folder; every process gets its answer
    decision: list[Any] = [None, None]
    if acc.is_main_process:
        out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(model_cfg.name)
        try:
            prepare_out_dir(out, resume, overwrite)
            decision = [str(out), None]
        except (OSError, ValueError) as e:
            decision = [str(out), e]
    if acc.num_processes > 1:
        broadcast_object_list(decision)
    if decision[1] is not None:
        raise decision[1]
    out_dir = Path(decision[0])
    cfg = replace(cfg, out_dir=str(out_dir))
    run = replace(run, train=cfg)
    require_weights(model_cfg, host, experts=not dcfg.labels)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    processor = Processor.from_config(model_cfg)
    data = build_dataset(
        host.datasets,
        dcfg.dataset,
        "train",
        fraction=dcfg.fraction * cfg.fraction,
        seed=cfg.seed,
        **dcfg.options,
    )
    model = create_model(model_cfg, host)
    model.freeze(cfg.stage)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    streaming = isinstance(data, StreamingDataset)
    aug = dcfg.augment
    feed = None
    text_data, n_text = None, 0
    if streaming:  # shards read as a stream (engine/stream.py): no sample list, no epoch length
        if cfg.epochs > 0 or cfg.cosine_per_epoch:
            raise ConfigError(
                f"dataset {dcfg.dataset!r} streams (its length is not known before an epoch "
                f"ends): set train.steps, not train.epochs or train.cosine_per_epoch"
            )
        if dcfg.text_dataset:
            raise ConfigError(
                f"data.text_dataset {dcfg.text_dataset!r} mixes map-style text into a batch; "
                f"dataset {dcfg.dataset!r} streams: unset data.text_dataset"
            )
        feed = StreamFeed(
            data,
            rank=acc.process_index,
            world=acc.num_processes,
            workers=dcfg.workers,
            batch_size=cfg.batch_size,
            image_size=aug.source_size or model_cfg.vision.image_size,
            reduce_sum=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
            labels=_stream_labels(dcfg.labels, model, host) if dcfg.labels else None,
            key_log=out_dir / "keys" / f"rank{acc.process_index}.jsonl"
            if dcfg.record_keys
            else None,
        )
        valid, dropped_empty = [], 0
    else:
        # empty captions are data noise: skipped (and counted), never fatal
        valid, dropped_empty = drop_empty([s.target for s in data.samples])
        if not valid:
            raise ValueError(f"dataset {dcfg.dataset!r}: every target text is empty")
        if dcfg.text_dataset:
            check_text_only(model, model_cfg, dcfg)
            n_text = text_rows(cfg.batch_size, dcfg.text_ratio)
            text_data = build_dataset(
                host.datasets, dcfg.text_dataset, "train", seed=cfg.seed, **dcfg.text_options
            )
    feeder = ExpertFeeder(model, host, "" if streaming else dcfg.labels)
    if cfg.init_from and not resume:
        load_weights(model, cfg.init_from)
    steps_per_epoch = max(
        1,
        (0 if streaming else len(data))
        // (cfg.batch_size * cfg.grad_accum * max(1, acc.num_processes)),
    )
    if cfg.epochs > 0:
        cfg.steps = cfg.epochs * steps_per_epoch
    if not streaming and (dcfg.validate != "off" or feeder.store is not None):
        t_check = time.time()
        validate_dataset(
            data,
            processor,
            images=dcfg.validate,
            store=feeder.store,
            experts=[type(feeder.experts[s.name]) for s in feeder.slots],
            skip_empty=True,
        )
        acc.print(f"checked {len(data)} samples in {time.time() - t_check:.1f}s")
    images = None if streaming else ImageCache(data, aug.source_size or model_cfg.vision.image_size)
    features = None
    if cfg.cache_frozen_features:
        if aug.enabled or streaming:
            raise ConfigError(
                "train.cache_frozen_features needs data.augment off and a map-style dataset: "
                "augmented images differ at every step and streamed ones are not revisited by "
                "index; turn one of them off"
            )
        if not getattr(getattr(model, "objective", None), "accepts_stem_features", False):
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
        if feed is not None:
            saved = read_state(state_dir).get("stream")
            if saved is None:
                raise ValueError(
                    f"--resume: {state_dir} was saved by a map-style run; this reader streams"
                )
            feed.restore(saved, step)
            if feed.remap is not None:
                acc.print(
                    f"resumed with another layout ({saved[0]['world']} x {saved[0]['workers']} "
                    f"-> {acc.num_processes} process(es) x {dcfg.workers} worker(s), batch "
                    f"{saved[0]['batch_size']} -> {cfg.batch_size}): the rest of epoch "
                    f"{feed.epoch} is read once, in another order than the interrupted run's"
                )
        acc.print(f"resumed from {state_dir} at step {step}")
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    counts = raw.parameter_counts()
    acc.print(
        f"model {model_cfg.name}: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen parameters; "
        + (
            f"streaming {data!r}; "
            if streaming
            else f"{len(valid)} training samples ({dcfg.dataset}; {dropped_empty} empty targets dropped); "
        )
        + f"{acc.num_processes} process(es); run folder {out_dir}; built in {time.time() - t0:.1f}s"
    )
    writer = _tensorboard(out_dir) if acc.is_main_process else None
    log_file = _open_log(out_dir / "log.jsonl", log) if acc.is_main_process else None
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=None if acc.is_main_process else True,  # None: off when stderr is not a TTY
    )

    def say(msg: str) -> None:
        if acc.is_main_process:
            (bar.write if not bar.disable else print)(msg)
            sys.stdout.flush()

    def stream_extra(state: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Every process's stream position, for the main process's ``save_state`` (collective)."""
        if feed is None:
            return None
        from accelerate.utils import gather_object

        mine = state or feed.state()
        return {"stream": gather_object([mine]) if acc.num_processes > 1 else [mine]}

    def stream_totals() -> dict[str, int]:
        """Samples consumed per source and bad samples/shards, summed over processes (collective)."""
        assert feed is not None
        names = [s.name for s in data.sources]
        mine = feed.counts()
        t = torch.tensor([float(mine[n]) for n in names] + [float(feed.problem_count)])
        t = acc.reduce(t.to(acc.device), reduction="sum").cpu()
        return {
            **{n: int(v) for n, v in zip(names, t[:-1].tolist(), strict=True)},
            "bad": int(t[-1]),
        }

    t_train, cpu_train = time.time(), time.process_time()
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    interrupted = None
    data_error: DataError | None = None
    # the stream's loader workers stop with the loop, however it ends
    with _StopRequest() as stop, contextlib.closing(feed) if feed else contextlib.nullcontext():
        while step < end:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, steps_per_epoch) * g.get("lr_scale", 1.0)
            total = 0.0
            parts: dict[str, float] = {}
            raw.begin_step(step)  # schedules (momentum, ramps, warm-ups) count optimizer steps
            at_step_start = feed.state() if feed is not None else None
            rank, world = acc.process_index, acc.num_processes
            for micro in range(cfg.grad_accum):
                scale = 1.0
                labels = None
                pixels: torch.Tensor | None
                if feed is not None:
                    try:
                        fed = feed.next(step, micro)
                    except DataError as e:  # on_error="raise": every process stops here
                        data_error = e
                        break
                    samples, scale, labels = fed.samples, fed.scale, fed.labels
                    pixels = fed.pixels.to(acc.device)
                    imaged = samples
                else:
                    pos = batch_indices(
                        step, micro, rank, world, cfg, len(valid), cfg.batch_size - n_text
                    )
                    idx = [valid[i] for i in pos]
                    samples = [data[i] for i in idx]
                    if text_data is not None:
                        t_idx = batch_indices(
                            step, micro, rank, world, cfg, len(text_data), n_text, 1
                        )
                        samples += [text_data[i] for i in t_idx]
                    # images (and expert labels) of the rows that have one, in batch order
                    with_image = [i for i in idx if data[i].image is not None]
                    imaged = [data[i] for i in with_image]
                    pixels = None
                    if with_image:
                        pixels = torch.stack([images(i) for i in with_image]).to(acc.device)
                # dataset captions are data: cut to the model's limits, never refused
                batch = {
                    k: v.to(acc.device) for k, v in processor.batch(samples, truncate=True).items()
                }
                batch["image_idx"] = torch.tensor(
                    [image_index(s.image_id) for s in samples], device=acc.device
                )
                batch |= sample_extras(samples, acc.device)
                if len(imaged) < len(samples):
                    check_text_only(raw, model_cfg, dcfg)
                    batch["has_image"] = torch.tensor(
                        [s.image is not None for s in samples], device=acc.device
                    )
                experts = None
                if pixels is not None:
                    with torch.no_grad():
                        experts = feeder(pixels, [label_key(s) for s in imaged], maps=labels)
                        if aug.enabled:
                            pixels, experts = augment_batch(
                                pixels, experts, model_cfg.vision.image_size, aug
                            )
                    if features is not None:  # the frozen trunk's output, once per image
                        keys = [image_key(data, i) for i in with_image]
                        batch["stem_features"] = features(raw, keys, pixels)
                with acc.accumulate(model), acc.autocast():
                    out = model(pixels, **batch, experts=experts)
                    loss = out.loss
                    if feed is not None:  # 0: a process through its epoch before the others
                        loss = loss * scale
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], cfg.clip
                        )
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                total += loss.detach().float() / cfg.grad_accum
                for k, v in out.parts.items():
                    parts[k] = parts.get(k, 0.0) + float(v) / cfg.grad_accum
            if data_error is not None:
                interrupted = "bad data"
                break
            mean_loss = acc.reduce(total, reduction="mean").item()
            record: dict[str, Any] = {
                "step": step,
                "loss": mean_loss,
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.time() - t_train, 2),
            }
            if parts:  # the objective's parts (process means), e.g. mu-VLA's pair-weight quantiles
                names = sorted(parts)
                values = acc.reduce(
                    torch.tensor([parts[k] for k in names], device=acc.device), "mean"
                )
                record["parts"] = {
                    k: round(float(v), 6) for k, v in zip(names, values, strict=True)
                }
            logged = step % cfg.log_every == 0 or step == cfg.steps - 1
            if feed is not None and logged:  # samples per source (all processes), bad skipped
                totals = stream_totals()
                record["epoch"] = feed.epoch
                record["samples_per_source"] = {k: v for k, v in totals.items() if k != "bad"}
                record["bad_samples"] = totals["bad"]
            log.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", record["lr"], step)
                for k, v in record.get("parts", {}).items():
                    writer.add_scalar(f"train/{k}", v, step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if logged:
                shown = "".join(f"  {k} {v:.3g}" for k, v in record.get("parts", {}).items())
                say(
                    f"step {step:5d}  loss {mean_loss:.4f}  lr {record['lr']:.2e}  {time.time() - t_train:.0f}s{shown}"
                )
                if "samples_per_source" in record:
                    say(
                        f"  data (epoch {record['epoch']}): "
                        + ", ".join(f"{k} {v}" for k, v in record["samples_per_source"].items())
                        + f" samples; {record['bad_samples']} bad samples/shards skipped"
                    )
            step += 1
            asked = stop.signal is not None
            if acc.num_processes > 1:  # stop together: any process asked
                flag = torch.tensor([float(asked)], device=acc.device)
                asked = bool(acc.reduce(flag, reduction="sum").item() > 0)
            if asked:
                interrupted = signal.Signals(stop.signal).name if stop.signal else "signal"
                break
            if cfg.save_every and step % cfg.save_every == 0:
                extra = stream_extra()
                if acc.is_main_process:
                    save_state(state_dir, raw, opt, step, host, run, log, extra)
    bar.close()
    if log_file is not None:
        log_file.close()
    train_s = time.time() - t_train
    result: dict[str, Any] = {
        "model": model_cfg.name,
        "out_dir": str(out_dir),
        "steps": step,
        "train_seconds": round(train_s, 1),
        # CPU time of this process (all its threads): on a shared machine, what the work costs
        "train_cpu_seconds": round(time.process_time() - cpu_train, 1),
        **peak_memory_mib(),
        "first_loss": log[0]["loss"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "processes": acc.num_processes,
        "distributed": acc.distributed_type.value,
        "dropped_empty_targets": dropped_empty,
        **counts,
    }
    if interrupted:
        result["interrupted"] = interrupted
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
    extra = stream_extra(at_step_start if data_error is not None else None)
    if feed is not None:
        totals = stream_totals()
        problems = [p for s in (extra or {}).get("stream", []) for p in s["problems"]]
        result["stream"] = {
            "epoch": feed.epoch,
            "samples_per_source": {k: v for k, v in totals.items() if k != "bad"},
            "bad": totals["bad"],
            "bad_examples": problems[:20],
        }
    if acc.is_main_process:
        save_state(state_dir, raw, opt, step, host, run, log, extra)
        if interrupted:
            say(
                f"stopped at step {step} ({interrupted}); continue with --resume --out-dir {out_dir}"
            )
        if step >= cfg.steps:
            ckpt = out_dir / "model.safetensors"
            save_checkpoint(
                raw, ckpt, host, extra={"run": asdict(run), "final_loss": result["final_loss"]}
            )
            result["checkpoint"] = str(ckpt)
    if streaming and not dcfg.eval_dataset and step >= cfg.steps and cfg.eval_questions:
        acc.print("no evaluation: a streaming reader has no test split; set data.eval_dataset")
    elif step >= cfg.steps and cfg.eval_questions and acc.is_main_process:
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
                dcfg.options if dcfg.eval_options is None else dcfg.eval_options,
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
            out_dir / "result.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2))
        )
        plot_curves(log, result.get("eval", {}), out_dir / "curves.png")
        if writer is not None:
            writer.close()
    acc.wait_for_everyone()
    acc.end_training()
    if data_error is not None:  # on_error="raise": the state of the steps done is saved
        raise DataError(f"{data_error} (stopped at step {step}; state saved in {state_dir})")
    return result


def text_rows(batch_size: int, ratio: float) -> int:
    """Text-only samples in a batch of ``batch_size`` at ``data.text_ratio = ratio``."""
    n = round(batch_size * ratio)
    if not 0 < n < batch_size:
        raise ConfigError(
            f"data.text_ratio = {ratio} gives {n} text-only samples in a batch of {batch_size}: "
            f"choose a ratio that leaves 1 to {batch_size - 1} (or unset data.text_dataset)"
        )
    return n


def check_text_only(model: PrismerModel, model_cfg: ModelConfig, dcfg: DataConfig) -> None:
    """Text-only samples need a head that trains on them (class attribute ``text_only``)."""
    if not getattr(model.objective, "text_only", False):
        source = dcfg.text_dataset or dcfg.dataset
        raise ConfigError(
            f"data: {source!r} has text-only samples, but head {model_cfg.head!r} does not train "
            "on text alone (no text_only): use a head that does (e.g. prefix_lm) or image-text data"
        )


def sample_extras(samples: list, device: torch.device) -> dict[str, torch.Tensor]:
    """The samples' ``extras`` (per-sample tensors a reader attaches for its head, e.g.
    mu-VLA's retrieval embeddings) stacked into ``(B, ...)`` keyword arguments."""
    keys = set(samples[0].extras)
    if not keys and not any(s.extras for s in samples):
        return {}
    for n, s in enumerate(samples):
        if set(s.extras) != keys:
            raise ValueError(
                f"sample {n} ({s.image_id}) has extras {sorted(s.extras)}, sample 0 has "
                f"{sorted(keys)}: every sample of a batch must carry the same extras"
            )
    return {
        k: torch.stack([torch.as_tensor(s.extras[k]) for s in samples]).to(device) for k in keys
    }


def _stream_labels(root: str, model: PrismerModel, host: PluginHost):
    """The shard label store at ``root`` read by the loader workers, for the model's experts."""
    from prismkit.labels.shard_store import StreamLabels

    return StreamLabels(root, [host.expert(s.name) for s in getattr(model, "experts", ())])


def _open_log(path: Path, log: list[dict]):
    """``log.jsonl`` holding exactly ``log`` (a resumed run drops lines past its saved state),
    open for appending one line per step."""
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log)))
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed after the loop


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
