"""The embedded run: offline, on a laptop CPU, Prismer vs PrismerZ on easy-vqa, end to end.

Trains the offline default with experts (Prismer) and without (PrismerZ) on the same budget,
on easy-vqa's questions plus captions derived from its annotations; evaluates both on the test
split (VQA accuracy, BLEU-4 / CIDEr-D); writes a report folder and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from prismkit.core.config import resolve_config
from prismkit.core.host import get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.engine.train import DataConfig, EvalConfig, RunConfig, TrainConfig, train

VARIANTS = (("Prismer", "offline_default"), ("PrismerZ", "offline_default_z"))
METRICS = (
    "easyvqa/vqa_accuracy",
    "easyvqa/vqa_accuracy_open",
    "easyvqa_captions/bleu4",
    "easyvqa_captions/cider",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/embedded", help="report folder")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--stage",
        choices=("pretrain", "finetune"),
        default="finetune",
        help="finetune (Prismer's VQA recipe: language model unfrozen) or pretrain (frozen)",
    )
    p.add_argument("--image-size", type=int, default=64, help="easy-vqa images are 64x64")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[1.0],
        help="fractions of the training questions",
    )
    p.add_argument(
        "--eval-questions",
        type=int,
        default=1000,
        help="test questions (and caption images) evaluated",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prismkit demo", description=__doc__)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = getattr(args, "host", None) or get_plugin_manager()
    t0 = time.time()
    _gallery(host, out)
    labels = _precompute_labels(host, out / "labels")
    runs = []
    for fraction in args.fractions:
        for seed in args.seeds:
            for label, config in VARIANTS:
                model_cfg = resolve_config(host, config)
                model_cfg.vision = replace(model_cfg.vision, image_size=args.image_size)
                run_dir = out / f"{config}-f{fraction:g}-s{seed}"
                run = RunConfig(
                    data=DataConfig(
                        dataset="easyvqa+easyvqa_captions", fraction=fraction, labels=labels
                    ),
                    train=TrainConfig(
                        steps=args.steps,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        stage=args.stage,
                        warmup=max(1, args.steps // 10),
                        seed=seed,
                        eval_questions=args.eval_questions,
                        log_every=50,
                        out_dir=str(run_dir),
                    ),
                    # the table shows BLEU-4 and CIDEr-D: no Java metrics (METEOR, SPICE)
                    eval=EvalConfig(beams=3, max_length=10, min_length=1, java_metrics="off"),
                )
                print(f"\n=== {label} ({config}), {fraction:.0%} of the training data, seed {seed}")
                result = train(model_cfg, run, host, overwrite=True)  # the report is rebuilt
                runs.append(
                    {
                        "variant": label,
                        "config": config,
                        "fraction": fraction,
                        "seed": seed,
                        **result,
                    }
                )
    summary = _summarise(runs)
    report = {
        "runs": runs,
        "summary": summary,
        "seconds": round(time.time() - t0, 1),
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "host")},
    }
    atomic_write(
        out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2))
    )
    print(_table(summary))
    print(
        f"\nreport: {out}/metrics.json, {out}/*/curves.png, {out}/gallery.png ({report['seconds']:.0f}s)"
    )
    return 0


def _summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}, reverse=True):
        for label, _ in VARIANTS:
            sel = [r for r in runs if r["variant"] == label and r["fraction"] == fraction]
            row = {
                "variant": label,
                "fraction": fraction,
                "seeds": len(sel),
                "train_seconds": statistics.mean(r["train_seconds"] for r in sel),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in sel),
            }
            for m in METRICS:
                vals = [r["eval"][m] for r in sel if m in r.get("eval", {})]
                if vals:
                    row[m] = statistics.mean(vals)
                    row[m + " std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'model':<10}{'data':>6}{'seeds':>6}{'VQA acc':>16}{'VQA open':>16}{'BLEU-4':>16}{'CIDEr':>16}{'train s':>9}{'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(
            f"{r.get(m, float('nan')):>9.3f} ±{r.get(m + ' std', 0):.3f}" for m in METRICS
        )
        lines.append(
            f"{r['variant']:<10}{r['fraction']:>6.0%}{r['seeds']:>6}{cells}{r['train_seconds']:>9.0f}{r['peak_rss_mib']:>10.0f}"
        )
    lines.append("peak MiB: the process's peak resident memory when the run ended (runs share it)")
    return "\n".join(lines)


def _precompute_labels(host, root: Path) -> str:
    """Label every easy-vqa image (train and test) with Prismer's experts into a label store once;
    training then reads the labels instead of re-running the experts every step."""
    from prismkit.labels.runner import run_experts
    from prismkit.labels.store import LabelStore

    t = time.time()
    experts = {n: host.expert(n)() for n in resolve_config(host, VARIANTS[0][1]).experts}
    reader = host.datasets.get("easyvqa")
    paths = sorted({s.image for split in ("train", "test") for s in reader(split=split).samples})
    report = run_experts(
        paths,
        experts,
        LabelStore(root),
        batch_size=64,
        num_workers=1,
        shard=(0, 1),
        log=lambda *_: None,
    )
    if report.failures:
        raise RuntimeError(
            f"expert labels failed for {len(report.failures)} image(s): {report.failures[:3]}"
        )
    print(
        f"expert labels for {len(paths)} easy-vqa images ({', '.join(experts)}) in {root}: {time.time() - t:.0f}s"
    )
    return str(root)


def _gallery(host, out: Path) -> None:
    """The enabled experts of the offline default on a few easy-vqa test images."""
    from prismkit.labels.gallery import render_gallery

    data = host.datasets.get("easyvqa")(split="test")
    images = sorted({data[i].image for i in range(0, 40, 10)})
    experts = {n: host.expert(n)() for n in resolve_config(host, VARIANTS[0][1]).experts}
    render_gallery(images, experts, out / "gallery.png")
