"""The training loop: resume continues the same curve; two CPU processes stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_cli_sets, tiny_config
from safetensors.torch import load_file

from prismkit.engine.batching import batch_indices
from prismkit.engine.train import (
    DataConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
    train,
)


def _run(tmp: Path, steps: int = 6, batch_size: int = 4, **kw) -> RunConfig:
    t = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=3e-3,
        warmup=2,
        log_every=100,
        eval_questions=0,
        out_dir=str(tmp),
        **kw,
    )
    return RunConfig(data=DataConfig(dataset="easyvqa", fraction=0.05), train=t)


def test_resume_continues_the_same_curve(host, tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir)
    full = train(cfg, _run(tmp_path / "full"), host)
    part = _run(tmp_path / "part")
    train(cfg, part, host, stop_after=3)  # "killed" after 3 steps
    state = json.loads((tmp_path / "part" / "last" / "state.json").read_text())
    assert state["step"] == 3 and not (tmp_path / "part" / "model.safetensors").exists()
    resumed = train(cfg, part, host, resume=True)
    a = [
        json.loads(line)["loss"]
        for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    ]
    b = [
        json.loads(line)["loss"]
        for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    ]
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-6)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    wa, wb = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "part" / "model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-6)


def test_batches_are_a_pure_function_of_position():
    cfg = TrainConfig(batch_size=4, grad_accum=2, seed=3)
    first = batch_indices(5, 1, 0, 2, cfg, 10)
    assert first == batch_indices(5, 1, 0, 2, cfg, 10)
    ranks = batch_indices(5, 1, 0, 2, cfg, 1000) + batch_indices(5, 1, 1, 2, cfg, 1000)
    assert len(set(ranks)) == 8  # the two ranks read different samples
    epoch = [
        i
        for s in range(5)
        for i in batch_indices(s, 0, 0, 1, TrainConfig(batch_size=2, seed=3), 10)
    ]
    assert sorted(epoch) == list(range(10))  # one epoch visits every sample once


def test_run_config_overrides_and_errors(tmp_path):
    run = load_run_config(
        None, ["train.steps=7", 'data.dataset="easyvqa_captions"', "eval.beams=2"]
    )
    assert (run.train.steps, run.data.dataset, run.eval.beams) == (7, "easyvqa_captions", 2)
    bad = tmp_path / "run.toml"
    bad.write_text('[train]\nsteps = "many"\n')
    from prismkit.core.config import ConfigError

    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_run_config(bad)


@pytest.mark.slow
def test_two_cpu_processes_stay_in_sync(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP averages gradients, replicas end identical."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "prismkit.core.cli",
        "train",
        "tiny",
        *tiny_cli_sets(tiny_dir),
        "--set",
        "data.fraction=0.05",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-questions",
        "0",
        "--out-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2 and result["ranks_in_sync"] is True
    assert result["distributed"] == "MULTI_CPU"


def _losses(folder: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "log.jsonl").read_text().splitlines()]


def test_gradient_accumulation_inside_the_loop(host, tiny_dir, tmp_path):
    """2 micro-batches of 4 per optimiser step read the same samples as 1 batch of 8 and give
    the same losses and weights (per-sequence sums averaged over the batch); the optimiser steps
    once per step, not per micro. Captions: Prismer's VQA framing pads the question block to the
    batch's longest question, so VQA losses depend on the batch's composition (a reference
    quirk), micro-batched or not.
    PrismerZ: the expert stems' BatchNorm normalises each micro-batch by its own statistics, so
    with experts accumulation is close to, not equal to, one large batch (as in any framework).
    Dropout off: its masks are drawn per micro-batch, a different random stream."""
    cfg = tiny_config(tiny_dir, "tiny_z")
    cfg.language.dropout = cfg.language.attention_dropout = 0.0
    steps: list[int] = []
    real_step = torch.optim.AdamW.step

    def counting(self, *a, **k):
        steps.append(1)
        return real_step(self, *a, **k)

    run_one = _run(tmp_path / "one", batch_size=8, grad_accum=1)
    run_two = _run(tmp_path / "two", batch_size=4, grad_accum=2)
    for run in (run_one, run_two):
        run.data.dataset = "easyvqa_captions"
        run.data.fraction = 0.2
    one = train(cfg, run_one, host)
    torch.optim.AdamW.step = counting  # type: ignore[method-assign]
    try:
        two = train(cfg, run_two, host)
    finally:
        torch.optim.AdamW.step = real_step  # type: ignore[method-assign]
    assert len(steps) == 6  # accelerate skips the step on the first micro-batch of each pair
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=1e-5
    )  # fmt: skip
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)  # summation order


def test_gradient_checkpointing_inside_the_loop(host, tiny_dir, tmp_path, monkeypatch):
    """With train.gradient_checkpointing the vision and language blocks run under
    torch.utils.checkpoint (recomputed in backward); losses and weights match a plain run."""
    import torch.utils.checkpoint as ckpt

    calls: list[int] = []
    real = ckpt.checkpoint

    def counting(fn, *a, **k):
        calls.append(1)
        return real(fn, *a, **k)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    cfg = tiny_config(tiny_dir)
    train(cfg, _run(tmp_path / "plain", steps=3), host)
    assert calls == []
    train(cfg, _run(tmp_path / "ckpt", steps=3, gradient_checkpointing=True), host)
    layers = cfg.vision.layers + cfg.language.layers
    assert len(calls) == 3 * layers  # every block of every training step
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "ckpt")), torch.tensor(_losses(tmp_path / "plain")), rtol=1e-6, atol=1e-6
    )  # fmt: skip
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fsdp_on_cpu_is_named_not_silently_dropped(host, tiny_dir, tmp_path, monkeypatch, capsys):
    """accelerate 1.15 enables FSDP only on accelerator devices; on CPU (gloo, also with 2
    processes: tried, it runs MULTI_CPU DDP) ACCELERATE_USE_FSDP is ignored. The run says so."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    result = train(tiny_config(tiny_dir), _run(tmp_path / "r", steps=1), host)
    assert result["distributed"] == "NO"
    err = capsys.readouterr().err
    assert "warning: FSDP was asked for (ACCELERATE_USE_FSDP) but accelerate runs NO here" in err
