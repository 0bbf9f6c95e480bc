"""`prismkit bench --full`: the paper's BASE shapes with random weights (no download).

CLIP ViT-B/16 + RoBERTa-base, six experts (depth 1, normal 3, edge 1 dense; three 64-channel
semantic), 224 px, 30-token captions, batch 1 and 4: a training step (FLOPs counted, MFU against
the measured matmul limit in the training precision) and beam-3 captioning (max 20 tokens) with
and without the KV cache. On a GPU the step runs under bf16 autocast and the limit is measured
in bf16; on the CPU everything is fp32.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from prismkit.core.config import resolve_config
from prismkit.core.generation import BeamConfig, beam_search
from prismkit.core.host import PluginHost
from prismkit.core.model import PrismerModel, SemanticInput, create_model
from prismkit.engine.train import TrainConfig, configure_optimizer

TEXT_LEN = 30
PROMPT_LEN = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_limit(
    device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 5
) -> float:
    """Best dense ``n^3`` matmul FLOP/s on ``device`` in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def base_batch(
    model: PrismerModel, batch: int, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Random images, random expert maps of every declared kind, random captions."""
    g = torch.Generator().manual_seed(seed)
    s = model.config.vision.image_size
    experts: dict[str, Any] = {}
    for slot in model.experts:
        if slot.kind == "semantic":
            index = torch.randint(0, 20, (batch, s, s), generator=g)
            experts[slot.name] = SemanticInput(
                index.to(device), torch.randn(20, slot.channels, generator=g).to(device)
            )
        else:
            experts[slot.name] = torch.rand(batch, slot.channels, s, s, generator=g).to(device)
    vocab = model.config.language.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, TEXT_LEN), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return {
        "images": torch.rand(batch, 3, s, s, generator=g).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "experts": experts or None,
    }


def train_step(
    model: PrismerModel, batch: int, device: torch.device, peak: float, repeats: int
) -> dict[str, Any]:
    data = base_batch(model, batch, device)
    opt = configure_optimizer(model, TrainConfig())
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(**data).loss
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    flops = counter.get_total_flops()
    out = {
        "config": model.config.name,
        "batch": batch,
        "step_s": sec,
        "samples_per_s": batch / sec,
        "flops_per_step": flops,
        "achieved_tflops": flops / sec / 1e12,
        "mfu": flops / sec / peak,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    opt.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def captioning(model: PrismerModel, batch: int, device: torch.device) -> dict[str, Any]:
    """Beam 3 after ``<s>``, max_length 20 (transformers' count: 19 new tokens; EOS blocked so
    every caption is full length), cached vs uncached."""
    model.eval()
    data = base_batch(model, batch, device)
    vision = model.encode_image(data["images"], data["experts"])
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # RoBERTa's <s>
    mask = torch.ones_like(ids)
    out = {}
    for use_cache in (True, False):
        cfg = BeamConfig(beams=3, max_length=20, min_length=20, use_cache=use_cache)
        _sync(device)
        t = time.perf_counter()
        beam_search(model.language, vision, ids, mask, eos=2, pad=1, cfg=cfg)
        _sync(device)
        out["cache" if use_cache else "no_cache"] = batch / (time.perf_counter() - t)
    out["speedup"] = out["cache"] / out["no_cache"]
    return out


def bench_base(host: PluginHost, print_table, repeats: int = 2) -> dict[str, Any]:
    """The BASE-shapes section: training steps at batch 1 and 4 for Prismer and PrismerZ BASE,
    then cached/uncached captioning. Random weights: ``pretrained=False``, nothing downloaded."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_limit(device, dtype, n=8192 if device.type == "cuda" else 2048)
    rows, results = (
        [],
        {
            "device": str(device),
            "dtype": str(dtype),
            "peak_tflops": peak / 1e12,
            "train": [],
            "captioning": {},
        },
    )
    for name in ("prismer_base", "prismerz_base"):
        torch.manual_seed(0)
        model = create_model(resolve_config(host, name), host, pretrained=False).to(device)
        for batch in (1, 4):
            r = train_step(model, batch, device, peak, repeats)
            results["train"].append(r)
            rows.append(
                [
                    name,
                    batch,
                    r["step_s"],
                    r["samples_per_s"],
                    r["flops_per_step"] / 1e9,
                    r["achieved_tflops"] * 1e3,
                    100 * r["mfu"],
                ]
            )
        if name == "prismer_base":
            results["captioning"] = captioning(model, 4, device)
        del model
    print_table(
        f"8. BASE shapes ({device}, {dtype}; limit {peak / 1e9:.0f} GFLOP/s measured): training step",
        ["config", "batch", "s/step", "samples/s", "GFLOP/step", "GFLOP/s", "MFU %"],
        rows,
    )
    c = results["captioning"]
    print_table(
        "8b. BASE captioning, beam 3, 20 tokens, batch 4",
        ["decoding", "captions/s"],
        [["cache", c["cache"]], ["no cache", c["no_cache"]]],
    )
    print(f"  key/value cache speed-up: {c['speedup']:.2f}x")
    return results
