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


def _run(tmp: Path, **kw) -> RunConfig:
    t = TrainConfig(
        steps=6,
        batch_size=4,
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
