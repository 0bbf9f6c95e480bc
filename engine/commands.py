"""The engine's commands (plugin ``engine``): train, eval, caption, ask, demo."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from prismkit.core.cli import Command, add_set_argument
from prismkit.core.config import resolve_config
from prismkit.core.hookspecs import hookimpl

RUN_PREFIXES = ("train.", "data.", "eval.")


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the run config (train./data./eval.) and for the model config."""
    run = [i for i in items if i.startswith(RUN_PREFIXES)]
    return run, [i for i in items if not i.startswith(RUN_PREFIXES)]


def _toml(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_train(args: argparse.Namespace) -> int:
    from prismkit.engine.train import TrainConfig, load_run_config, train

    host = args.host
    run_sets, model_sets = _split_overrides(args.set)
    flags = [
        f"train.{f.name}={_toml(getattr(args, f.name))}"
        for f in fields(TrainConfig)
        if getattr(args, f.name) is not None
    ]
    run = load_run_config(args.run, run_sets + flags)
    result = train(resolve_config(host, args.config, model_sets), run, host, resume=args.resume)
    print(json.dumps(result, indent=2))
    return 0


def _predictor(args: argparse.Namespace):
    from prismkit.core.checkpoint import load_checkpoint
    from prismkit.core.processor import Processor
    from prismkit.engine.evaluate import Predictor
    from prismkit.labels.feeder import ExpertFeeder

    host = args.host
    model = load_checkpoint(args.checkpoint, host).eval()
    feeder = ExpertFeeder(model, host, getattr(args, "labels", ""), compute_missing=True)
    return Predictor(model, Processor.from_config(model.config), feeder), host


def cmd_caption(args: argparse.Namespace) -> int:
    from prismkit.core.generation import BeamConfig

    pred, _ = _predictor(args)
    own = getattr(pred.model, "caption", None)
    if own is not None:  # an architecture with its own generation (BLIP): its defaults apply
        pixels = pred.processor.images(args.images)
        caps = own(
            pixels,
            pred.processor,
            args.prompt,
            num_beams=args.beams,
            max_length=args.max_length,
            min_length=args.min_length,
        )
    else:
        cfg = BeamConfig(
            beams=args.beams or 3, max_length=args.max_length or 20, min_length=args.min_length or 8
        )
        caps = pred.caption(
            args.images, "a picture of" if args.prompt is None else args.prompt, cfg
        )
    for path, cap in zip(args.images, caps, strict=True):
        print(f"{path}\t{cap}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    pred, _ = _predictor(args)
    candidates = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    print(pred.answer([args.image], [args.question], candidates)[0])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prismkit.core.io import atomic_write
    from prismkit.engine.evaluate import evaluate_datasets
    from prismkit.engine.train import load_run_config

    pred, host = _predictor(args)
    run = load_run_config(args.run, args.set)
    d = run.data
    metrics = evaluate_datasets(
        pred.model,
        pred.processor,
        host,
        d.eval_dataset or d.dataset,
        d.eval_split,
        d.options,
        pred.feeder,
        run.eval,
        args.limit,
    )
    print(f"{'metric':<22}{'value':>10}")
    for k, v in metrics.items():
        print(f"{k:<22}{v:>10.4f}")
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return 0


def _configure_train(t: argparse.ArgumentParser) -> None:
    from prismkit.engine.train import TrainConfig

    t.add_argument("config", nargs="?", default="offline_default", help="model config name or TOML")
    t.add_argument("--run", help="run config TOML with [data], [train], [eval] tables")
    add_set_argument(
        t, "override a field: model fields (vision.width=...) or train./data./eval. fields"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/last (model, optimiser, RNG, data position)",
    )
    for f in fields(TrainConfig):
        t.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(getattr(TrainConfig(), f.name)),
            default=None,
        )
    t.set_defaults(func=cmd_train)


def _checkpoint_command(c: argparse.ArgumentParser) -> None:
    c.add_argument("checkpoint", help="a prismkit .safetensors checkpoint")
    c.add_argument(
        "--labels", default="", help="label store folder (experts run on the fly otherwise)"
    )


def _configure_caption(c: argparse.ArgumentParser) -> None:
    _checkpoint_command(c)
    c.add_argument("images", nargs="+")
    c.add_argument("--prompt", help="default: the model's (\"a picture of\"; BLIP: its config's)")
    c.add_argument("--beams", type=int, help="default 3")
    c.add_argument("--max-length", type=int, help="default 20 (BLIP: 20 tokens with the prompt)")
    c.add_argument("--min-length", type=int, help="default 8 (BLIP: 5 tokens with the prompt)")
    c.set_defaults(func=cmd_caption)


def _configure_ask(c: argparse.ArgumentParser) -> None:
    _checkpoint_command(c)
    c.add_argument("image")
    c.add_argument("question")
    c.add_argument(
        "--candidates", help="comma-separated answers to rank (closed-ended); omit to generate"
    )
    c.set_defaults(func=cmd_ask)


def _configure_eval(c: argparse.ArgumentParser) -> None:
    _checkpoint_command(c)
    c.add_argument(
        "--run", help="run config TOML ([data] names the dataset, [eval] the beam settings)"
    )
    add_set_argument(c)
    c.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    c.add_argument("--out", help="write the metrics JSON here")
    c.set_defaults(func=cmd_eval)


def _configure_demo(c: argparse.ArgumentParser) -> None:
    from prismkit.engine import demo

    demo.add_arguments(c)
    c.set_defaults(func=demo.run)


@hookimpl
def register_commands(register) -> None:
    register(
        Command(
            "train",
            "train a model config on a dataset (accelerate: one CPU to many GPUs)",
            _configure_train,
        )
    )
    register(Command("eval", "evaluate a checkpoint on a dataset", _configure_eval))
    register(Command("caption", "caption images with a checkpoint", _configure_caption))
    register(Command("ask", "answer a question about an image", _configure_ask))
    register(
        Command(
            "demo", "the embedded offline run: Prismer vs PrismerZ on easy-vqa", _configure_demo
        )
    )
