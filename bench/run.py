"""CPU benchmark: matmul ceiling, training steps (throughput, FLOPs, MFU, memory), expert scaling
with and without the Experts Resampler, semantic label tiling, cached vs uncached beam search,
expert label generation speed and label-store data loading against the training step.

Prints one table per section and writes everything as JSON (``--out``, atomically)::

    python -m prismkit.bench.run            # full run, a few minutes on a laptop CPU
    python -m prismkit.bench.run --quick    # seconds: one batch size, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from prismkit import hookimpl
from prismkit.core.config import ModelConfig, resolve_config
from prismkit.core.expert import Expert, LabelMap
from prismkit.core.generation import BeamConfig, beam_search
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.core.model import PrismerModel, create_model
from prismkit.core.processor import Processor, load_image
from prismkit.engine.train import TrainConfig, configure_optimizer
from prismkit.labels.feeder import dense_inputs
from prismkit.labels.runner import resize_square, run_experts
from prismkit.labels.store import LabelStore

DEFAULT_OUT = "bench/results-cpu.json"
TEXT_LEN = 16  # token ids per training sample; the first IGNORED_PREFIX labels are -100
IGNORED_PREFIX = 8
LABEL_DIM = 64  # semantic label-embedding width (Prismer's)
LABEL_CLASSES = 134  # labels in one batch's table (COCO panoptic classes + background)
MEMORY_METHOD = (
    "peak_rss_delta: peak resident set size (sampled from /proc/self/statm every 1 ms) above the "
    "RSS just before the first step, over all steps of the case (activations, gradients, "
    "optimizer state, allocator caching); ru_maxrss_delta: growth of the process high-water mark "
    "(getrusage) over the case, 0 when an earlier case already peaked higher"
)


@dataclass(frozen=True)
class Settings:
    """How much work each section does."""

    quick: bool
    matmul_n: int
    matmul_repeats: int
    train_batches: tuple[int, ...]
    train_repeats: int
    expert_counts: tuple[int, ...]
    grid_sizes: tuple[int, ...]  # training-step grid: image sizes (x expert_counts x train_batches)
    expert_batch: int
    expert_repeats: int
    tiling_batch: int
    tiling_size: int
    tiling_repeats: int
    gen_batch: int
    gen_length: int
    gen_repeats: int
    label_experts: tuple[str, ...] | None  # None: every registered expert
    label_size: int
    label_batch: int
    label_repeats: int
    loader_images: int
    loader_workers: tuple[int, ...]
    loader_step_batch: int  # offline_default training batch the loader is compared with

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                quick=True,
                matmul_n=512,
                matmul_repeats=3,
                train_batches=(2,),
                train_repeats=1,
                expert_counts=(1, 3),
                grid_sizes=(64,),
                expert_batch=1,
                expert_repeats=1,
                tiling_batch=4,
                tiling_size=224,
                tiling_repeats=1,
                gen_batch=1,
                gen_length=8,
                gen_repeats=1,
                label_experts=("edge", "seg_superpixel"),
                label_size=64,
                label_batch=2,
                label_repeats=1,
                loader_images=32,
                loader_workers=(0,),
                loader_step_batch=2,  # section 2's quick batch: no extra training step
            )
        return cls(
            quick=False,
            matmul_n=2048,
            matmul_repeats=5,
            train_batches=(8, 32),
            train_repeats=2,
            expert_counts=(0, 1, 3, 6),
            grid_sizes=(128, 224),
            expert_batch=8,
            expert_repeats=3,
            tiling_batch=32,
            tiling_size=224,
            tiling_repeats=3,
            gen_batch=8,
            gen_length=20,
            gen_repeats=2,
            label_experts=None,
            label_size=224,
            label_batch=4,
            label_repeats=3,
            loader_images=256,
            loader_workers=(0, 2),
            loader_step_batch=32,
        )


# -- measurement helpers ------------------------------------------------------------------------


def median_time(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; the wall times in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def current_rss() -> int | None:
    """Resident set size in bytes (Linux), None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def max_rss() -> int:
    """The process's RSS high-water mark in bytes (getrusage; kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class RssPeak:
    """Samples RSS in a background thread while the ``with`` block runs; ``peak`` is the maximum."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.start = current_rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta(self) -> int | None:
        return None if self.start is None or self.peak is None else self.peak - self.start


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table: first column left, the rest right."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n== {title}")
    for j, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def mib(n: int | None) -> float | str:
    return "n/a" if n is None else n / 2**20


# -- 1. machine limit ---------------------------------------------------------------------------


def bench_matmul(s: Settings) -> dict[str, Any]:
    """Dense fp32 ``n x n @ n x n``: best and median GFLOP/s."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(s.matmul_n, s.matmul_n, generator=g)
    b = torch.randn(s.matmul_n, s.matmul_n, generator=g)
    out = torch.empty(s.matmul_n, s.matmul_n)
    times = median_time(lambda: torch.mm(a, b, out=out), warmup=2, repeats=s.matmul_repeats)
    flops = 2 * s.matmul_n**3
    result = {
        "n": s.matmul_n,
        "repeats": len(times),
        "best_gflops": flops / min(times) / 1e9,
        "median_gflops": flops / statistics.median(times) / 1e9,
    }
    print_table(
        f"1. machine limit: fp32 matmul {s.matmul_n}^3, {torch.get_num_threads()} threads",
        ["", "GFLOP/s"],
        [["best", result["best_gflops"]], ["median", result["median_gflops"]]],
    )
    return result


# -- 2. training step ---------------------------------------------------------------------------


def synthetic_batch(
    model: PrismerModel, host: PluginHost, batch: int, seed: int = 0
) -> dict[str, Any]:
    """Random images, real expert labels for them, random token ids with a -100 label prefix."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.vision.image_size
    images = torch.rand(batch, 3, size, size, generator=g)
    experts = {n: host.expert(n)() for n in cfg.experts}
    with torch.no_grad():
        expert_inputs = dense_inputs(experts, images) if experts else None
    ids = torch.randint(1000, cfg.language.vocab_size, (batch, TEXT_LEN), generator=g)
    labels = ids.clone()
    labels[:, :IGNORED_PREFIX] = -100
    return {
        "images": images,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "experts": expert_inputs,
    }


def parameter_memory(model: PrismerModel, opt: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Bytes of parameters, gradients and optimizer state, split trainable / frozen."""
    out = {k: {"params": 0, "grads": 0, "optimizer": 0} for k in ("trainable", "frozen")}
    for p in model.parameters():
        part = out["trainable" if p.requires_grad else "frozen"]
        part["params"] += p.nbytes
        part["grads"] += p.grad.nbytes if p.grad is not None else 0
        part["optimizer"] += sum(
            v.nbytes for v in opt.state.get(p, {}).values() if isinstance(v, Tensor)
        )
    return out


def train_case(
    model: PrismerModel, host: PluginHost, batch: int, repeats: int, peak_flops: float
) -> dict[str, Any]:
    """Forward + backward + AdamW step at one batch size (fresh optimizer).

    The first step runs under FlopCounterMode (FLOPs, and the warm-up); the timed steps follow.
    """
    data = synthetic_batch(model, host, batch)
    opt = configure_optimizer(model, TrainConfig())
    model.train()

    def loss() -> Tensor:
        return model(
            data["images"],
            data["input_ids"],
            data["attention_mask"],
            data["labels"],
            experts=data["experts"],
        ).loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    gc.collect()
    maxrss0 = max_rss()
    with RssPeak() as rss:
        with FlopCounterMode(display=False) as counter:
            loss().backward()
        opt.step()
        memory = parameter_memory(model, opt)
        times = median_time(step, warmup=0, repeats=repeats)
    flops = counter.get_total_flops()
    sec = statistics.median(times)
    result = {
        "config": model.config.name,
        "batch": batch,
        "repeats": repeats,
        "step_s": sec,
        "samples_per_s": batch / sec,
        "flops_per_step": flops,
        "achieved_gflops": flops / sec / 1e9,
        "mfu": flops / sec / peak_flops,
        "peak_rss_delta_bytes": rss.delta,
        "peak_rss_bytes": rss.peak,
        "ru_maxrss_delta_bytes": max_rss() - maxrss0,
        "parameter_memory_bytes": memory,
        **model.parameter_counts(),
    }
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    gc.collect()
    return result


def bench_train(
    s: Settings, host: PluginHost, peak_flops: float
) -> tuple[list[dict[str, Any]], PrismerModel]:
    """Section 2 for offline_default and offline_default_z; returns the offline_default model."""
    results, keep = [], None
    for name in ("offline_default", "offline_default_z"):
        torch.manual_seed(0)
        model = create_model(resolve_config(host, name), host)
        for batch in s.train_batches:
            results.append(train_case(model, host, batch, s.train_repeats, peak_flops))
        if name == "offline_default":
            keep = model
        else:
            del model
    rows = [
        [
            r["config"],
            r["batch"],
            r["step_s"] * 1e3,
            r["samples_per_s"],
            r["flops_per_step"] / 1e9,
            r["achieved_gflops"],
            100 * r["mfu"],
            mib(r["peak_rss_delta_bytes"]),
            mib(r["ru_maxrss_delta_bytes"]),
        ]
        for r in results
    ]
    print_table(
        "2. training step (fwd + bwd + AdamW, fp32; memory in MiB, see JSON meta.memory_method)",
        [
            "config",
            "batch",
            "ms/step",
            "samples/s",
            "GFLOP/step",
            "GFLOP/s",
            "MFU %",
            "peak RSS +",
            "maxrss +",
        ],
        rows,
    )
    mem_rows = []
    for r in results:
        m = r["parameter_memory_bytes"]
        for part in ("trainable", "frozen"):
            mem_rows.append(
                [
                    f"{r['config']} b{r['batch']} {part}",
                    r[part],
                    mib(m[part]["params"]),
                    mib(m[part]["grads"]),
                    mib(m[part]["optimizer"]),
                ]
            )
    print_table(
        "2b. parameter memory (MiB)",
        ["config / part", "parameters", "weights", "grads", "AdamW state"],
        mem_rows,
    )
    assert keep is not None
    return results, keep


# -- 3. experts scaling ------------------------------------------------------------------------


def _random_map(self: Expert, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
    b, _, h, w = images.shape
    return LabelMap(torch.rand(b, self.channels, h, w))


def bench_expert_classes(n: int = 6) -> list[type[Expert]]:
    """``n`` throwaway 1-channel dense experts ``bench_e1..bench_en`` returning random maps."""
    return [
        type(
            f"BenchExpert{i}",
            (Expert,),
            {"name": f"bench_e{i}", "kind": "dense", "channels": 1, "predict": _random_map},
        )
        for i in range(1, n + 1)
    ]


class BenchExpertsPlugin:
    """Registers the throwaway benchmark experts (an in-code plugin)."""

    __name__ = "bench_experts"
    classes: ClassVar[list[type[Expert]]] = bench_expert_classes()

    @hookimpl
    def register_experts(self, register: Callable[[type], None]) -> None:
        for cls in self.classes:
            register(cls)


Path_ = Literal["resampler", "direct"]


@torch.no_grad()
def forward_parts(
    model: PrismerModel, data: dict[str, Any], path: Path_
) -> tuple[dict[str, float], Tensor, int]:
    """One inference forward, timed per part; ``path="direct"`` feeds all expert tokens straight
    into the vision backbone (no resampler). Returns part times, logits and backbone tokens."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    x = model.check_images(data["images"])
    tokens = model.vision.embed(x)
    t1 = time.perf_counter()
    t["rgb stem"] = t1 - t0
    if model.experts:
        maps = model.expert_maps(data["experts"], x.shape[0])
        parts = []
        for slot, (m, inst) in zip(model.experts, maps, strict=True):
            f = model.expert_stems[slot.stem](m)
            if inst is not None:
                f = model.add_instances(f, inst)
            f = f.flatten(2).transpose(1, 2)
            parts.append(f + model.vision.positions(math.isqrt(f.shape[1])))
        expert_tokens = torch.cat(parts, dim=1)
        t2 = time.perf_counter()
        t["expert stems"] = t2 - t1
        if path == "resampler":
            assert model.resampler is not None
            expert_tokens = model.resampler(expert_tokens)
        t["resampler"] = time.perf_counter() - t2
        tokens = torch.cat([tokens, expert_tokens], dim=1)
    else:
        t["expert stems"] = t["resampler"] = 0.0
    t3 = time.perf_counter()
    vision = model.vision.encode(tokens)
    t4 = time.perf_counter()
    t["vision backbone"] = t4 - t3
    hidden, _ = model.language(data["input_ids"], vision, data["attention_mask"])
    logits = model.language.logits(hidden)
    t["language decoder"] = time.perf_counter() - t4
    return t, logits, tokens.shape[1]


def bench_model(
    base: ModelConfig, host: PluginHost, experts: int, image_size: int | None = None
) -> PrismerModel:
    """``base``'s shapes with random weights and ``experts`` benchmark experts (0: PrismerZ)."""
    cfg = copy.deepcopy(base)
    cfg.name = f"bench_experts_{experts}"
    cfg.vision.pretrained = None
    cfg.language.pretrained = None
    cfg.vision.image_size = image_size or cfg.vision.image_size
    cfg.experts = [f"bench_e{i}" for i in range(1, experts + 1)]
    torch.manual_seed(0)
    return create_model(cfg, host, pretrained=False)


def bench_experts(s: Settings, base: ModelConfig) -> list[dict[str, Any]]:
    """Section 3: per-part forward time as experts grow, with and without the resampler."""
    host = get_plugin_manager(extra_plugins=[BenchExpertsPlugin()])
    results = []
    for n in s.expert_counts:
        model = bench_model(base, host, n).eval()
        data = synthetic_batch(model, host, s.expert_batch)
        data["labels"] = None
        if n == max(s.expert_counts):  # the hand-split forward is the model's forward
            with torch.no_grad():
                ref = model(
                    data["images"],
                    data["input_ids"],
                    data["attention_mask"],
                    experts=data["experts"],
                ).logits
            got = forward_parts(model, data, "resampler")[1]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for path in ("resampler", "direct") if n else ("resampler",):
            forward_parts(model, data, path)  # warm-up
            runs = [forward_parts(model, data, path) for _ in range(s.expert_repeats)]
            parts = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
            results.append(
                {
                    "experts": n,
                    "path": path if n else "none (PrismerZ)",
                    "batch": s.expert_batch,
                    "backbone_tokens": runs[0][2],
                    "parts_s": parts,
                    "total_s": sum(parts.values()),
                }
            )
        del model
    rows = [
        [
            r["experts"],
            r["path"],
            r["backbone_tokens"],
            *(1e3 * v for v in r["parts_s"].values()),
            1e3 * r["total_s"],
        ]
        for r in results
    ]
    print_table(
        f"3. experts scaling: inference forward, batch {s.expert_batch}, ms per part (median of {s.expert_repeats})",
        ["experts", "path", "tokens", *results[0]["parts_s"], "total"],
        rows,
    )
    return results


def bench_train_grid(s: Settings, base: ModelConfig, peak_flops: float) -> list[dict[str, Any]]:
    """Section 3b: the training step of offline_default's shapes (random weights) as experts,
    batch and image size grow: 0 experts is PrismerZ."""
    host = get_plugin_manager(extra_plugins=[BenchExpertsPlugin()])
    results = []
    for size in s.grid_sizes:
        for n in sorted({0, *s.expert_counts}):
            model = bench_model(base, host, n, size)
            model.freeze("pretrain")
            for batch in s.train_batches:
                r = train_case(model, host, batch, s.train_repeats, peak_flops)
                results.append({"experts": n, "image_size": size, **r})
            del model
    print_table(
        "3b. training step vs experts, batch and image size (fwd + bwd + AdamW, fp32, random weights)",
        ["experts", "size", "batch", "ms/step", "samples/s", "GFLOP/step", "MFU %", "peak RSS +"],
        [
            [
                r["experts"],
                r["image_size"],
                r["batch"],
                r["step_s"] * 1e3,
                r["samples_per_s"],
                r["flops_per_step"] / 1e9,
                100 * r["mfu"],
                mib(r["peak_rss_delta_bytes"]),
            ]
            for r in results
        ],
    )
    return results


# -- 4. label tiling ---------------------------------------------------------------------------


def bench_tiling(s: Settings) -> dict[str, Any]:
    """Semantic labels: one embedding lookup on the batch vs a dense tensor per sample + collate."""
    g = torch.Generator().manual_seed(0)
    b, hw = s.tiling_batch, s.tiling_size
    index = torch.randint(0, LABEL_CLASSES, (b, hw, hw), generator=g)
    table = torch.randn(LABEL_CLASSES, LABEL_DIM, generator=g)

    def on_the_fly() -> Tensor:  # what PrismerModel.expert_maps does
        return F.embedding(index, table).permute(0, 3, 1, 2)

    def per_sample() -> Tensor:  # a dataset's __getitem__ per sample, then default_collate
        return torch.stack([table[index[i]].permute(2, 0, 1).contiguous() for i in range(b)])

    torch.testing.assert_close(on_the_fly(), per_sample(), rtol=0, atol=0)
    dense = b * LABEL_DIM * hw * hw * 4
    result: dict[str, Any] = {"batch": b, "size": hw, "classes": LABEL_CLASSES, "dim": LABEL_DIM}
    for name, fn, handed, written in (
        ("on_the_fly", on_the_fly, index.nbytes + table.nbytes, dense),
        ("per_sample_loop", per_sample, dense, 2 * dense),
    ):
        times = median_time(fn, warmup=1, repeats=s.tiling_repeats)
        result[name] = {
            "ms_per_batch": 1e3 * statistics.median(times),
            "bytes_handed_to_model": handed,
            "bytes_written": written,
        }
    result["speedup"] = (
        result["per_sample_loop"]["ms_per_batch"] / result["on_the_fly"]["ms_per_batch"]
    )
    print_table(
        f"4. semantic label tiling: batch {b}, {hw}x{hw}, ({LABEL_CLASSES}, {LABEL_DIM}) table",
        ["method", "ms/batch", "MiB loader->model", "MiB written"],
        [
            [
                k,
                result[k]["ms_per_batch"],
                mib(result[k]["bytes_handed_to_model"]),
                mib(result[k]["bytes_written"]),
            ]
            for k in ("on_the_fly", "per_sample_loop")
        ],
    )
    print(f"  on-the-fly is {result['speedup']:.1f}x faster")
    return result


# -- 5. generation -----------------------------------------------------------------------------

PROMPTS = [
    "a picture of",
    "what is in the image?",
    "describe the photo.",
    "what color is the shape?",
    "is there a circle?",
    "what shape is it?",
    "a photo of a",
    "the image shows",
]


def bench_generation(s: Settings, model: PrismerModel, host: PluginHost) -> dict[str, Any]:
    """Beam search (3 beams, exactly ``gen_length`` new tokens: EOS is blocked throughout) with
    and without the key/value cache. One untimed warm-up, on the cached run (same kernels)."""
    model.eval()
    processor = Processor.from_config(model.config)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.gen_batch)]
    p = processor.prompts(prompts)
    data = synthetic_batch(model, host, s.gen_batch)
    with torch.no_grad():
        vision = model.encode_image(data["images"], data["experts"])
    n = s.gen_length
    result: dict[str, Any] = {
        "batch": s.gen_batch,
        "beams": 3,
        "new_tokens": n,
    }
    for use_cache in (True, False):
        cfg = BeamConfig(beams=3, max_length=n, min_length=n, new_tokens=True, use_cache=use_cache)
        out: list[list[int]] = []

        def run(cfg: BeamConfig = cfg, out: list[list[int]] = out) -> None:
            out[:] = beam_search(
                model.language,
                vision,
                p["input_ids"],
                p["attention_mask"],
                processor.eos,
                processor.pad,
                cfg,
            ).new_tokens(processor.eos, processor.pad)

        times = median_time(run, warmup=int(use_cache), repeats=s.gen_repeats)
        sec = statistics.median(times)
        result["cache" if use_cache else "no_cache"] = {
            "s_per_batch": sec,
            "captions_per_s": s.gen_batch / sec,
            "tokens_per_caption": statistics.mean(len(o) for o in out),
        }
    result["speedup"] = result["cache"]["captions_per_s"] / result["no_cache"]["captions_per_s"]
    print_table(
        f"5. generation: beam 3, {n} new tokens, batch {s.gen_batch} (vision encoded once, untimed)",
        ["decoding", "s/batch", "captions/s", "tokens/caption"],
        [
            [
                k,
                result[k]["s_per_batch"],
                result[k]["captions_per_s"],
                result[k]["tokens_per_caption"],
            ]
            for k in ("cache", "no_cache")
        ],
    )
    print(f"  key/value cache speed-up: {result['speedup']:.2f}x")
    return result


# -- 6. expert label generation ----------------------------------------------------------------


def photo_batch(size: int, batch: int) -> Tensor:
    """Real photos (skimage astronaut, coffee, chelsea) resized to ``size x size``, cycled to
    ``batch`` images: ``(batch, 3, size, size)`` in [0, 1]."""
    from skimage import data

    photos = [
        resize_square(load_image(f()), size) for f in (data.astronaut, data.coffee, data.chelsea)
    ]
    return torch.stack([photos[i % len(photos)] for i in range(batch)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unavailable_reason(host: PluginHost, name: str) -> str | None:
    """Why expert ``name`` (or an expert it requires) cannot run here; None when it can."""
    cls = host.experts.get(name)
    status = cls().weights_status()
    if not status.available:
        return f"weights missing: {status.where}"
    for r in cls.requires:
        if r not in host.experts:
            return f"requires {r!r}, which no plugin registers"
        why = unavailable_reason(host, r)
        if why is not None:
            return f"requires {r!r}: {why}"
    return None


@torch.inference_mode()
def required_inputs(host: PluginHost, cls: type[Expert], images: Tensor) -> dict[str, LabelMap]:
    """Labels of the experts ``cls`` requires, on CPU (recursively, untimed)."""
    out = {}
    for r in cls.requires:
        req = host.experts.get(r)
        out[r] = req().predict(images, required_inputs(host, req, images))
    return out


def expert_case(
    cls: type[Expert],
    images: Tensor,
    inputs: dict[str, LabelMap],
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Load time, first-call time and median batch time of one expert on ``device``."""
    expert = cls(device=device)
    x = images.to(device)
    inputs = {k: LabelMap(v.values.to(device), v.names) for k, v in inputs.items()}

    @torch.inference_mode()
    def call() -> LabelMap:
        out = expert.predict(x, inputs)
        _sync(device)
        return out

    t0 = time.perf_counter()
    expert.load()
    _sync(device)
    t1 = time.perf_counter()
    cls.check_output(call(), x)  # warm-up, checked
    t2 = time.perf_counter()
    sec = statistics.median(median_time(call, warmup=0, repeats=repeats))
    return {
        "expert": cls.name,
        "kind": cls.kind,
        "device": device.type,
        "load_s": t1 - t0,
        "warmup_s": t2 - t1,
        "s_per_batch": sec,
        "images_per_s": x.shape[0] / sec,
    }


def bench_expert_labels(s: Settings, host: PluginHost) -> dict[str, Any]:
    """Section 6: images per second of every registered expert that can run here."""
    images = photo_batch(s.label_size, s.label_batch)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name, cls in host.experts.items():
        if s.label_experts is not None and name not in s.label_experts:
            skipped[name] = "not in quick mode"
            continue
        why = unavailable_reason(host, name)
        if why is not None:
            skipped[name] = why
            continue
        inputs = required_inputs(host, cls, images)
        for device in devices:
            results.append(expert_case(cls, images, inputs, device, s.label_repeats))
            gc.collect()
    result = {
        "images": "skimage astronaut, coffee, chelsea (cycled)",
        "size": s.label_size,
        "batch": s.label_batch,
        "repeats": s.label_repeats,
        "results": results,
        "skipped": skipped,
    }
    print_table(
        f"6. expert label generation: batch {s.label_batch} photos at {s.label_size}x{s.label_size}"
        f" (median of {s.label_repeats} after a warm-up; load = lazy weight loading)",
        ["expert", "kind", "device", "load s", "first call s", "ms/batch", "images/s"],
        [
            [
                r["expert"],
                r["kind"],
                r["device"],
                r["load_s"],
                r["warmup_s"],
                1e3 * r["s_per_batch"],
                r["images_per_s"],
            ]
            for r in results
        ],
    )
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    return result


# -- 7. data loading ---------------------------------------------------------------------------


class StoreLabelDataset(Dataset):
    """``(image (3, S, S), dense labels (C, S, S))`` per image file, labels via ``LabelStore.get``."""

    def __init__(
        self, paths: Sequence[str], store: LabelStore, expert: type[Expert], size: int
    ) -> None:
        self.paths, self.store, self.expert, self.size = list(paths), store, expert, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.paths[i]
        image = load_image(path)
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = resize_square(image, self.size)
        return image, self.store.get(path, self.expert).values[0]


def loader_case(dataset: Dataset, batch: int, workers: int) -> dict[str, Any]:
    """Two passes over ``dataset`` (persistent workers): the first includes worker start-up and
    image hashing, the second is the steady rate."""
    loader = DataLoader(
        dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0
    )
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        rates.append(n / (time.perf_counter() - t0))
    del loader  # shuts the persistent workers down
    return {
        "num_workers": workers,
        "first_epoch_samples_per_s": rates[0],
        "samples_per_s": rates[1],
    }


def loader_step(
    s: Settings,
    host: PluginHost,
    train: Sequence[dict[str, Any]],
    model: PrismerModel | None,
    peak_flops: float,
) -> dict[str, Any]:
    """offline_default's training step at ``s.loader_step_batch``: from section 2, else measured."""
    for r in train:
        if r["config"] == "offline_default" and r["batch"] == s.loader_step_batch:
            return {**r, "source": "section 2"}
    if model is None:
        torch.manual_seed(0)
        model = create_model(resolve_config(host, "offline_default"), host)
    return {**train_case(model, host, s.loader_step_batch, 1, peak_flops), "source": "measured"}


def bench_loading(
    s: Settings,
    host: PluginHost,
    train: Sequence[dict[str, Any]] = (),
    model: PrismerModel | None = None,
    peak_flops: float = 1e12,
) -> dict[str, Any]:
    """Section 7: easy-vqa images + "edge" labels read from a label store through a DataLoader,
    against the samples per second of an offline_default training step."""
    import easy_vqa

    size, batch, name = 64, 32, "edge"
    found = easy_vqa.get_train_image_paths()
    paths = [found[k] for k in sorted(found)][: s.loader_images]
    expert = host.experts.get(name)
    step = loader_step(s, host, train, model, peak_flops)
    step_sps = step["samples_per_s"]
    with tempfile.TemporaryDirectory(prefix="prismkit-bench-") as root:
        t0 = time.perf_counter()
        report = run_experts(
            paths, {name: expert()}, LabelStore(root, size), batch_size=batch, log=lambda _: None
        )
        build_s = time.perf_counter() - t0
        if report.failures or report.computed != len(paths):
            raise RuntimeError(f"label store build failed: {report.summary()}")
        store_bytes = sum(f.stat().st_size for f in Path(root).rglob("*.safetensors"))
        dataset = StoreLabelDataset(paths, LabelStore(root, size), expert, size)  # cold hashes
        loaders = [loader_case(dataset, batch, w) for w in s.loader_workers]
    for r in loaders:
        r["load_ms_per_step_batch"] = 1e3 * step["batch"] / r["samples_per_s"]
        r["loader_to_step_ratio"] = r["samples_per_s"] / step_sps
        r["step_waits"] = r["samples_per_s"] < step_sps
    result = {
        "dataset": "easy_vqa train",
        "expert": name,
        "images": len(paths),
        "size": size,
        "batch": batch,
        "store_build": {"s": build_s, "images_per_s": len(paths) / build_s},
        "store_bytes": store_bytes,
        "loaders": loaders,
        "step": {
            "config": step["config"],
            "batch": step["batch"],
            "image_size": resolve_config(host, "offline_default").vision.image_size,
            "step_s": step["step_s"],
            "samples_per_s": step_sps,
            "source": step["source"],
        },
    }
    st = result["step"]
    print_table(
        f"7. data loading: {len(paths)} easy-vqa images + {name!r} labels from a label store "
        f"({size} px), DataLoader batch {batch}",
        [
            "workers",
            "1st epoch samples/s",
            "samples/s",
            f"load ms/{st['batch']}",
            "step samples/s",
            "loader/step",
            "step waits",
        ],
        [
            [
                r["num_workers"],
                r["first_epoch_samples_per_s"],
                r["samples_per_s"],
                r["load_ms_per_step_batch"],
                step_sps,
                r["loader_to_step_ratio"],
                "yes" if r["step_waits"] else "no",
            ]
            for r in loaders
        ],
    )
    print(
        f"  store: {len(paths)} images labelled by run_experts in {build_s:.2f}s "
        f"({len(paths) / build_s:.0f} images/s), {store_bytes / 2**20:.2f} MiB\n"
        f"  step: {st['config']} batch {st['batch']} at {st['image_size']} px, "
        f"{st['step_s'] * 1e3:.0f} ms ({st['source']}); num_workers=0 adds the load time to "
        f"every step, workers > 0 overlap it (but share the CPU cores with the step)"
    )
    return result


# -- entry point -------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then os.replace)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a fast, smaller run (tests, smoke)")
    parser.add_argument(
        "--full", action="store_true", help="also the paper's BASE shapes (random weights, minutes)"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results (default: {DEFAULT_OUT})")


def main(argv: list[str] | None = None) -> int:
    """Run the CPU benchmark, print tables, write JSON; returns the exit status."""
    parser = argparse.ArgumentParser(prog="prismkit bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    s = Settings.make(args.quick)
    t0 = time.perf_counter()
    host = getattr(args, "host", None) or get_plugin_manager()
    print(
        f"prismkit CPU benchmark{' (quick)' if s.quick else ''}: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32"
    )
    sections: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        sections[name] = time.perf_counter() - t
        return value

    load_before = os.getloadavg()
    with torch.no_grad():
        matmul = timed("matmul", lambda: bench_matmul(s))
    train, model = timed("train", lambda: bench_train(s, host, matmul["best_gflops"] * 1e9))
    base = resolve_config(host, "offline_default")
    experts = timed("experts", lambda: bench_experts(s, base))
    grid = timed("train_grid", lambda: bench_train_grid(s, base, matmul["best_gflops"] * 1e9))
    tiling = timed("label_tiling", lambda: bench_tiling(s))
    generation = timed("generation", lambda: bench_generation(s, model, host))
    expert_labels = timed("expert_labels", lambda: bench_expert_labels(s, host))
    loading = timed(
        "data_loading",
        lambda: bench_loading(s, host, train, model, matmul["best_gflops"] * 1e9),
    )
    if args.full:
        from prismkit.bench.models import bench_base

        base_shapes = timed("base_shapes", lambda: bench_base(host, print_table))
    results = {
        "meta": {
            "quick": s.quick,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "memory_method": MEMORY_METHOD,
            "train_step": "zero_grad + forward + backward + AdamW step (no grad clipping); expert labels precomputed",
            "seconds": time.perf_counter() - t0,
            "section_seconds": sections,
            # other processes' load shares these cores: compare runs with similar load only
            "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "matmul": matmul,
        "train": train,
        "experts": experts,
        "train_grid": grid,
        "label_tiling": tiling,
        "generation": generation,
        "expert_labels": expert_labels,
        "data_loading": loading,
    }
    if args.full:
        results["base_shapes"] = base_shapes
    out = Path(args.out)
    write_json(out, results)
    print(
        f"\nwrote {out} in {results['meta']['seconds']:.0f}s "
        f"(1-min load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
