"""The embedded run: offline, on a laptop CPU, Prismer vs PrismerZ on easy-vqa, end to end.

Trains the offline default with experts (Prismer) and without (PrismerZ) on the same budget,
on easy-vqa's questions plus captions derived from its annotations; evaluates both on the whole
test split (VQA accuracy overall and per question type, BLEU-4 / CIDEr-D on every test image's
caption); writes a report folder and prints a table. ``--experts A B ...`` runs the expert
ablation instead: one Prismer per expert, each alone, against PrismerZ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from prismkit.core.config import ModelConfig, resolve_config
from prismkit.core.host import get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.engine.train import DataConfig, EvalConfig, RunConfig, TrainConfig, train

PRISMER, PRISMER_Z = "offline_default", "offline_default_z"
# easy-vqa's question kinds (``datasets.easyvqa.question_type``), as the table heads them
QUESTION_TYPES = {
    "shape": "shape",
    "color": "colour",
    "yes_no_shape": "y/n shape",
    "yes_no_color": "y/n colour",
}
VQA = "easyvqa/vqa_accuracy"
METRICS = (
    VQA,
    *(f"{VQA}/{t}" for t in QUESTION_TYPES),
    "easyvqa/vqa_accuracy_open",
    "easyvqa_captions/bleu4",
    "easyvqa_captions/cider",
)
HEADS = ("VQA acc", *QUESTION_TYPES.values(), "VQA open", "BLEU-4", "CIDEr")
SCORED = ("easyvqa/samples", "easyvqa_captions/samples")


@dataclass(frozen=True)
class Variant:
    label: str
    config: str
    # the model's experts; None = the config's own
    experts: tuple[str, ...] | None = None

    @property
    def folder(self) -> str:
        return self.config if self.experts is None else f"{self.config}-{'+'.join(self.experts)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/embedded", help="report folder")
    p.add_argument("--steps", type=int, default=800, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument(
        "--new-lr",
        type=float,
        default=None,
        help="peak learning rate of the newly initialised parts (train.new_lr; default: --lr)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="the language model's dropout and attention dropout (the offline default: 0.1); "
        "off for a run shorter than an epoch",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="bf16",
        help="bf16 autocast (fast on CPUs with AVX512-BF16/AMX) or fp32 (auto: fp32 on the CPU)",
    )
    p.add_argument(
        "--stage",
        choices=("pretrain", "finetune"),
        default="finetune",
        help="finetune (Prismer's VQA recipe: language model unfrozen) or pretrain (frozen)",
    )
    p.add_argument("--image-size", type=int, default=64, help="easy-vqa images are 64x64")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs trained side by side, each in its own process with its share of the "
        "threads (default: 2 where there are 2 cores; 1 = one after another in this process)",
    )
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
        default=-1,
        help="test questions (and caption images) scored; -1 = the whole test split",
    )
    p.add_argument(
        "--experts",
        nargs="+",
        default=None,
        help="expert ablation: one Prismer per expert named, each alone, against PrismerZ "
        "(default: Prismer with the offline default's experts)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=4,
        help="VQA ranking: the k likeliest answers by first token are fully scored (Prismer's "
        "k_test); 0 = all 13",
    )
    p.add_argument(
        "--vqa-open",
        action="store_true",
        help="also generate every test answer by beam search (VQA open; slow on the CPU)",
    )
    p.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="recompute the frozen image trunk at every step (train.cache_frozen_features off)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prismkit demo", description=__doc__)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def variants(experts: list[str] | None) -> list[Variant]:
    if not experts:
        return [Variant("Prismer", PRISMER), Variant("PrismerZ", PRISMER_Z)]
    # the baseline first: an interrupted ablation still has something to compare against
    return [Variant("PrismerZ", PRISMER_Z)] + [
        Variant(f"Prismer[{e}]", PRISMER, (e,)) for e in experts
    ]


@dataclass(frozen=True)
class _Planned:
    """One training run of the demo: a variant at one data fraction and seed."""

    variant: Variant
    fraction: float
    seed: int
    model_cfg: ModelConfig
    run: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.run.train.out_dir)

    @property
    def title(self) -> str:
        return (
            f"{self.variant.label} ({self.variant.folder}), {self.fraction:.0%} of the training "
            f"data, seed {self.seed}"
        )


def plan(args: argparse.Namespace, host, out: Path) -> list[_Planned]:
    """Every run of the demo, in order: fractions, then seeds, then variants."""
    runs = []
    for fraction in args.fractions:
        for seed in args.seeds:
            for v in variants(args.experts):
                model_cfg = resolve_config(host, v.config)
                model_cfg.vision = replace(model_cfg.vision, image_size=args.image_size)
                model_cfg.language = replace(
                    model_cfg.language, dropout=args.dropout, attention_dropout=args.dropout
                )
                if v.experts is not None:
                    model_cfg.experts = list(v.experts)
                run = RunConfig(
                    data=DataConfig(
                        dataset="easyvqa+easyvqa_captions",
                        fraction=fraction,
                        labels=str(out / "labels") if model_cfg.experts else "",
                    ),
                    train=TrainConfig(
                        steps=args.steps,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        new_lr=args.new_lr,
                        precision=args.precision,
                        stage=args.stage,
                        warmup=max(1, args.steps // 10),
                        seed=seed,
                        cache_frozen_features=not args.no_feature_cache,
                        eval_questions=args.eval_questions,
                        log_every=100,
                        out_dir=str(out / f"{v.folder}-f{fraction:g}-s{seed}"),
                    ),
                    # the table shows BLEU-4 and CIDEr-D: no Java metrics (METEOR, SPICE)
                    eval=EvalConfig(
                        beams=3,
                        max_length=10,
                        min_length=1,
                        top_k=args.top_k or None,
                        vqa_open=args.vqa_open,
                        java_metrics="off",
                    ),
                )
                runs.append(_Planned(v, fraction, seed, model_cfg, run))
    return runs


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.jobs < 1:
        raise SystemExit(f"prismkit demo: --jobs {args.jobs}: need at least 1")
    out.mkdir(parents=True, exist_ok=True)
    host = getattr(args, "host", None) or get_plugin_manager()
    t0 = time.time()
    planned = plan(args, host, out)
    # every input checked before the first step: a folder that is not one of ours stops here
    results: dict[int, dict] = {}
    for i, p in enumerate(planned):
        done = _done(p.run_dir, p.model_cfg, p.run)
        if done is not None:
            print(f"reusing the finished run in {p.run_dir} (same model and settings)")
            results[i] = done
    experts = sorted({e for p in planned for e in p.model_cfg.experts})
    _gallery(host, experts, out)
    pending = [i for i in range(len(planned)) if i not in results]
    if pending:
        _precompute_labels(host, experts, out / "labels", args.jobs)
    jobs = min(args.jobs, len(pending))
    if jobs > 1:
        results |= _train_parallel([(i, planned[i]) for i in pending], jobs, out)
    else:
        for i in pending:
            print(f"\n=== {planned[i].title}")
            results[i] = _train_one(planned[i], host)
    runs = [
        {
            "variant": p.variant.label,
            "config": p.variant.config,
            "experts": p.model_cfg.experts,
            "fraction": p.fraction,
            "seed": p.seed,
            **results[i],
        }
        for i, p in enumerate(planned)
    ]
    summary = _summarise(runs, [v.label for v in variants(args.experts)])
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


def _train_one(p: _Planned, host) -> dict:
    result = train(p.model_cfg, p.run, host, overwrite=True)
    if "interrupted" in result:  # the state is saved; the demo stops with the run
        raise SystemExit(f"prismkit demo: {p.title}: stopped ({result['interrupted']})")
    _record(p.run_dir, p.model_cfg, p.run)
    return result


def _train_in_worker(p: _Planned, threads: int, log_path: str) -> dict:
    """One spawned process: train and evaluate ``p``, its output appended to ``log_path``."""
    import torch

    torch.set_num_threads(threads)
    with open(log_path, "a") as f, redirect_stdout(f), redirect_stderr(f):
        print(f"=== {p.title}", flush=True)
        return _train_one(p, get_plugin_manager())


def _train_parallel(todo: list[tuple[int, _Planned]], jobs: int, out: Path) -> dict[int, dict]:
    """The runs in ``jobs`` spawned processes sharing the machine's threads (on 2 cores two
    single-threaded runs side by side do 1.3x the work of one two-threaded run at a time)."""
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    print(
        f"\n{len(todo)} runs, {jobs} at a time ({threads} thread(s) each); "
        f"each run's output in {out}/<run>.log"
    )
    results: dict[int, dict] = {}
    failed: list[str] = []
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(_train_in_worker, p, threads, str(out / f"{p.run_dir.name}.log")): (i, p)
            for i, p in todo
        }
        for f in as_completed(futures):
            i, p = futures[f]
            try:
                results[i] = f.result()
            except BaseException as e:  # noqa: BLE001 - reported below, with the run's log
                failed.append(f"{p.title}: {e} (see {out}/{p.run_dir.name}.log)")
                continue
            acc = results[i].get("eval", {}).get(VQA, float("nan"))
            print(
                f"done: {p.title}: VQA acc {acc:.3f}, "
                f"train {results[i]['train_seconds']:.0f}s ({time.strftime('%H:%M:%S')})",
                flush=True,
            )
    if failed:
        raise SystemExit("prismkit demo: " + "; ".join(failed))
    return results


def _settings(model_cfg, run: RunConfig) -> dict:
    return json.loads(json.dumps({"model": model_cfg.to_dict(), "run": asdict(run)}))


def _done(run_dir: Path, model_cfg, run: RunConfig) -> dict | None:
    """The result of a finished run in ``run_dir`` with the same model and settings (an
    interrupted or sharded ablation continues where it stopped); None when the folder is new.
    A folder holding anything else is refused, never overwritten."""
    if not run_dir.exists():
        return None
    record, result = run_dir / "demo_run.json", run_dir / "result.json"
    same = record.is_file() and json.loads(record.read_text()) == _settings(model_cfg, run)
    if same and result.is_file():
        done = json.loads(result.read_text())
        if "eval" in done:
            return done
    raise SystemExit(
        f"prismkit demo: {run_dir} already holds another or an unfinished run; "
        "remove it or choose another --out"
    )


def _record(run_dir: Path, model_cfg, run: RunConfig) -> None:
    atomic_write(
        run_dir / "demo_run.json",
        lambda tmp: Path(tmp).write_text(json.dumps(_settings(model_cfg, run), indent=1)),
    )


def _summarise(runs: list[dict], labels: list[str]) -> list[dict]:
    """One row per variant and data fraction: each metric's mean and standard deviation over
    seeds, the questions and caption images scored, train seconds and peak memory."""
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}, reverse=True):
        for label in labels:
            sel = [r for r in runs if r["variant"] == label and r["fraction"] == fraction]
            if not sel:
                continue
            row = {
                "variant": label,
                "experts": sel[0]["experts"],
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
            for m in SCORED:
                counts = {r["eval"][m] for r in sel if m in r.get("eval", {})}
                if counts:
                    row[m] = int(min(counts))
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    """Accuracy overall and per question type, open-ended accuracy, caption scores; ``± std``
    over seeds when there are several."""
    seeds = max(r["seeds"] for r in rows)
    width = 15 if seeds > 1 else 11
    name = max(10, *(len(r["variant"]) + 1 for r in rows))
    # a metric no run measured (VQA open without --vqa-open) gets no column
    shown = [(m, h) for m, h in zip(METRICS, HEADS, strict=True) if any(m in r for r in rows)]
    head = f"{'model':<{name}}{'data':>5}{'seeds':>6}" + "".join(f"{h:>{width}}" for _, h in shown)
    head += f"{'questions':>10}{'captions':>9}{'train s':>8}{'peak MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = ""
        for m, _ in shown:
            v = r.get(m, float("nan"))
            cell = f"{v:.3f}" + (f" ±{r.get(m + ' std', 0):.3f}" if seeds > 1 else "")
            cells += f"{cell:>{width}}"
        lines.append(
            f"{r['variant']:<{name}}{r['fraction']:>5.0%}{r['seeds']:>6}{cells}"
            f"{r.get(SCORED[0], 0):>10}{r.get(SCORED[1], 0):>9}"
            f"{r['train_seconds']:>8.0f}{r['peak_rss_mib']:>9.0f}"
        )
    lines.append(
        "VQA acc: Prismer's closed-set ranking of easy-vqa's 13 answers (the --top-k likeliest "
        "by first token fully scored; overall, then per question type); VQA open (--vqa-open): "
        "beam search; questions / captions: test questions and test images scored; "
        "peak MiB: the process's peak resident memory when the run ended (runs share it)"
    )
    return "\n".join(lines)


def _precompute_labels(host, experts: list[str], root: Path, jobs: int = 1) -> str:
    """Label every easy-vqa image (train and test) with the runs' experts into a label store
    once; training and evaluation then read the labels instead of running the experts."""
    from prismkit.labels.runner import run_experts
    from prismkit.labels.store import LabelStore

    if not experts:
        return ""
    t = time.time()
    reader = host.datasets.get("easyvqa")
    paths = sorted({s.image for split in ("train", "test") for s in reader(split=split).samples})
    report = run_experts(
        paths,
        {n: host.expert(n)() for n in experts},
        LabelStore(root),
        batch_size=64,
        num_workers=jobs,
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


def _gallery(host, experts: list[str], out: Path) -> None:
    """The runs' experts on a few easy-vqa test images."""
    from prismkit.labels.gallery import render_gallery

    if not experts:
        return
    data = host.datasets.get("easyvqa")(split="test")
    images = sorted({data[i].image for i in range(0, 40, 10)})
    render_gallery(images, {n: host.expert(n)() for n in experts}, out / "gallery.png")
