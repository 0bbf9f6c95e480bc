"""The CPU benchmark's quick mode runs end to end and writes every section."""

from __future__ import annotations

import json

from prismkit.bench.run import main


def test_bench_quick_writes_all_sections(tmp_path):
    out = tmp_path / "b.json"
    assert main(["--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["meta"]["quick"] is True
    assert r["matmul"]["best_gflops"] > 0
    assert {t["config"] for t in r["train"]} == {"offline_default", "offline_default_z"}
    for t in r["train"]:
        assert t["samples_per_s"] > 0 and t["flops_per_step"] > 0 and t["mfu"] > 0
        mem = t["parameter_memory_bytes"]
        assert mem["trainable"]["params"] > 0 and mem["trainable"]["grads"] > 0
        assert mem["trainable"]["optimizer"] > 0 and mem["frozen"]["params"] > 0
        assert mem["frozen"]["grads"] == 0 and mem["frozen"]["optimizer"] == 0
    assert {(e["experts"], e["path"]) for e in r["experts"]} == {
        (n, p) for n in (1, 3) for p in ("resampler", "direct")
    }
    for e in r["experts"]:
        assert e["total_s"] > 0 and e["parts_s"]["vision backbone"] > 0
    grid = r["train_grid"]
    assert {(g["experts"], g["image_size"], g["batch"]) for g in grid} == {
        (n, 64, 2) for n in (0, 1, 3)
    }
    by_n = {g["experts"]: g for g in grid}
    assert by_n[0]["flops_per_step"] < by_n[1]["flops_per_step"] < by_n[3]["flops_per_step"]
    assert all(g["mfu"] > 0 and g["samples_per_s"] > 0 for g in grid)
    for method in ("on_the_fly", "per_sample_loop"):
        assert r["label_tiling"][method]["ms_per_batch"] > 0
    gen = r["generation"]
    assert gen["cache"]["captions_per_s"] > 0 and gen["no_cache"]["captions_per_s"] > 0
    assert gen["cache"]["tokens_per_caption"] == gen["new_tokens"]  # EOS blocked throughout
    labels = r["expert_labels"]
    assert {e["expert"] for e in labels["results"] if e["device"] == "cpu"} == {
        "edge",
        "seg_superpixel",
    }
    for e in labels["results"]:
        assert e["images_per_s"] > 0 and e["s_per_batch"] > 0 and e["load_s"] >= 0
    assert "edge" not in labels["skipped"] and labels["skipped"]  # the rest, with reasons
    loading = r["data_loading"]
    assert loading["images"] == 32 and loading["store_bytes"] > 0
    assert loading["store_build"]["images_per_s"] > 0
    assert loading["step"]["config"] == "offline_default" and loading["step"]["samples_per_s"] > 0
    assert loading["step"]["source"] == "section 2"  # quick mode reuses section 2's batch
    assert [w["num_workers"] for w in loading["loaders"]] == [0]
    for w in loading["loaders"]:
        assert w["samples_per_s"] > 0 and w["first_epoch_samples_per_s"] > 0
        assert w["loader_to_step_ratio"] > 0 and isinstance(w["step_waits"], bool)
    assert set(r["meta"]["section_seconds"]) >= {"expert_labels", "data_loading"}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no temp file left


def test_base_shapes_cases_on_a_tiny_model(host, tiny_dir, capsys):
    """`bench --full` runs each BASE case in a fresh process; the same case code runs here on a
    tiny model with a dense and a semantic expert, then the tables and target checks."""
    import torch
    from helpers import tiny_config

    from prismkit.bench import models
    from prismkit.bench.run import print_table
    from prismkit.core.model import create_model

    cfg = tiny_config(tiny_dir, experts=["edge", "fake_semantic"])
    cpu = torch.device("cpu")
    batch = models.base_batch(create_model(cfg, host), 2, cpu)
    assert batch["experts"]["fake_semantic"].table.shape[-1] == 64
    train = models.train_case(host, cfg, 2, 1, cpu)
    assert train["gflop_per_step"] > 0 and train["mfu"] > 0 and train["cost_gflop"] > 0
    assert train["adamw_s"] > 0 and train["peak_rss_bytes"] > 0 and train["samples_per_s"] > 0
    caption = models.caption_case(host, cfg, 1, cpu)
    assert caption["new_tokens"] == models.MAX_LENGTH - 1  # EOS blocked: full-length captions
    assert caption["encode_s"] > 0 and caption["decode_s"] > 0 and caption["cost_gflop"] > 0
    assert caption["decode_step_bytes"] > 0 and caption["decode_step_vs_bound"] > 0
    assert models.main(["loader", "--config", "tiny", "--images", "4", "--repeats", "1"]) == 0
    loader = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert loader["samples_per_s"] > 0 and loader["experts"] == ["edge"]
    # the bf16 autocast rows (GPU, or a CPU with AMX): MFU against the bf16 matmul limit
    bf16 = models.train_case(host, cfg, 2, 1, cpu, dtype=torch.bfloat16)
    assert bf16["dtype"] == "torch.bfloat16" and bf16["gflop_per_step"] > 0 and bf16["mfu"] > 0
    caption_bf16 = models.caption_case(host, cfg, 1, cpu, dtype=torch.bfloat16)
    assert caption_bf16["dtype"] == "torch.bfloat16" and caption_bf16["encode_mfu"] > 0
    train.update(config="prismer_base", batch=4)  # stand in for the BASE rows
    bf16.update(config="prismer_base", batch=4)
    results = {"device": "cpu", "train": [train, bf16], "caption": caption, "loader": loader}
    results["caption_bf16"] = caption_bf16
    models._summarise(results)
    models._print(results, print_table)
    out = capsys.readouterr().out
    assert "BASE training step" in out and "x the bound" in out and "label store" in out
    assert "bfloat16" in out and "bf16 autocast" in out
    assert "speedup_vs_reference" in caption and "loader_vs_bound" in loader
    assert "meets_target" in train and "peak_rss_vs_reference" in train
    assert "meets_target" not in bf16  # the float32 targets are not judged on bf16 rows
    assert loader["step_samples_per_s"] == train["samples_per_s"]


def test_bench_case_runs_in_a_fresh_process():
    from prismkit.bench.models import run_case

    r = run_case(["loader", "--config", "tiny", "--images", "2", "--repeats", "1"])
    assert r["case"] == "loader" and r["samples_per_s"] > 0 and not r["profiled"]


def test_bench_case_profile_prints_the_costliest_operators(capsys):
    from prismkit.bench import models

    assert (
        models.main(
            ["loader", "--config", "tiny", "--images", "2", "--repeats", "1"] + ["--profile", "5"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["profiled"]
    assert "Self CPU" in err and "Input Shapes" in err


def test_flop_counter_counts_the_fast_linear_like_the_plain_one():
    import torch
    import torch.nn.functional as F

    from prismkit.bench.models import flop_counter
    from prismkit.core.layers import linear

    x, w, b = torch.randn(12, 1, 64), torch.randn(96, 64), torch.randn(96)
    counts = []
    for fn in (linear, F.linear):
        with torch.inference_mode(), flop_counter() as counter:
            fn(x, w, b)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 12 * 64 * 96


def test_peak_rss_of_a_case_is_its_own_not_its_parents():
    """A case started by a larger process (``bench --full``) reports its own high-water mark:
    getrusage's ru_maxrss survives exec and would report the parent's."""
    import subprocess
    import sys

    big = bytearray(1200 << 20)
    big[:: 1 << 12] = b"\1" * len(range(0, len(big), 1 << 12))  # touch every page
    code = (
        "import resource; from prismkit.bench.models import peak_rss; "
        "print(peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, maxrss = map(int, out.stdout.split())
    del big
    assert own < 1000 << 20  # python + torch, under the parent's 1200 MiB buffer
    if sys.platform == "linux":
        assert maxrss >= 1200 << 20  # what the old measurement reported
