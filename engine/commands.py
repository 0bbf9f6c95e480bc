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


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _toml(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flag_overrides(args: argparse.Namespace, sets: list[str]) -> list[str]:
    """``--steps 10`` etc. as ``train.steps=10`` overrides; a flag and a ``--set`` of the same
    field must agree (``ConfigError`` otherwise: neither silently wins)."""
    from prismkit.core.config import ConfigError, apply_override
    from prismkit.engine.train import TrainConfig

    given: dict[str, object] = {}
    for item in sets:
        data: dict = {}
        apply_override(data, item)
        for table, values in data.items():
            if isinstance(values, dict):
                given.update({f"{table}.{k}": v for k, v in values.items()})
    flags = []
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        key = f"train.{f.name}"
        if key in given and given[key] != value:
            raise ConfigError(
                f"{flag} {value} and --set {key}={given[key]!r} disagree: give one of them"
            )
        if f.name == "fraction" and "data.fraction" in given:
            raise ConfigError(
                f"{flag} {value} and --set data.fraction={given['data.fraction']!r} are the same "
                f"setting: give one of them"
            )
        flags.append(f"{key}={_toml(value)}")
    return flags


def cmd_train(args: argparse.Namespace) -> int:
    from prismkit.engine.train import load_run_config, run_model_overrides, train

    host = args.host
    run_sets, model_sets = _split_overrides(args.set)
    run = load_run_config(args.run, run_sets + _flag_overrides(args, run_sets))
    model_cfg = resolve_config(host, args.config, run_model_overrides(args.run) + model_sets)
    result = train(model_cfg, run, host, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(result, indent=2))
    return 130 if result.get("interrupted") else 0


def _predictor(args: argparse.Namespace):
    from prismkit.core.checkpoint import load_checkpoint
    from prismkit.core.preflight import require_weights
    from prismkit.core.processor import Processor
    from prismkit.engine.evaluate import Predictor
    from prismkit.labels.feeder import ExpertFeeder

    host = args.host
    model = load_checkpoint(args.checkpoint, host, overrides=getattr(args, "set", [])).eval()
    labels = getattr(args, "labels", "")
    if not labels:  # labels are computed on the fly: the experts' weights must be here
        require_weights(model.config, host, experts=True)
    feeder = ExpertFeeder(model, host, labels, compute_missing=True)
    return Predictor(model, Processor.from_config(model.config), feeder), host


def _read_images(pred, paths: list[str]) -> tuple[list[str], list, list[str]]:
    """Each image read on its own: ``(good paths, their (3, S, S) tensors, error lines)``; one bad
    image fails alone."""
    good, pixels, errors = [], [], []
    for p in paths:
        try:
            pixels.append(pred.processor.images([p])[0])
            good.append(p)
        except (ValueError, TypeError) as e:
            errors.append(str(e) if str(p) in str(e) else f"image {p}: {e}")
    return good, pixels, errors


def cmd_caption(args: argparse.Namespace) -> int:
    import sys

    import torch

    from prismkit.core.generation import BeamConfig

    pred, _ = _predictor(args)
    good, pixels, errors = _read_images(pred, args.images)
    own = getattr(pred.model, "caption", None)
    if not good:
        caps = []
    elif own is not None:  # an architecture with its own generation (BLIP): its defaults apply
        caps = own(
            torch.stack(pixels),
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
        caps = pred.caption(torch.stack(pixels), args.prompt, cfg, ids=good)
    captions = dict(zip(good, caps, strict=True))
    for e in errors:
        print(f"prismkit: error: {e}", file=sys.stderr)
    for path in args.images:
        if path in captions:
            print(f"{path}\t{captions[path]}")
    return 1 if errors else 0


def cmd_ask(args: argparse.Namespace) -> int:
    pred, _ = _predictor(args)
    candidates = None
    if args.candidates is not None:
        candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
        if not candidates:
            raise ValueError(f"--candidates {args.candidates!r} names no answer: give a,b,c")
    print(pred.answer([args.image], [args.question], candidates, top_k=args.k_test)[0])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prismkit.core.io import atomic_write
    from prismkit.engine.evaluate import evaluate_datasets
    from prismkit.engine.train import load_run_config

    run_sets, model_sets = _split_overrides(args.set)
    args.set = model_sets
    pred, host = _predictor(args)
    run = load_run_config(args.run, run_sets)
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
    t.add_argument(
        "--run",
        help="run config TOML with [data], [train], [eval] (and [model] overrides) tables, or a "
        "shipped recipe: prismer_pretrain, prismer_caption, prismer_vqa",
    )
    add_set_argument(
        t, "override a field: model fields (vision.width=...) or train./data./eval. fields"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/last (model, optimiser, RNG, data position)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT_DIR (its checkpoint, state, logs); refused otherwise",
    )
    for f in fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        t.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parse_bool if isinstance(default, bool) else type(default),
            default=None,
            metavar=f.name.upper(),
            help=f"train.{f.name} (default {default!r})",
        )
    t.set_defaults(func=cmd_train)


def _checkpoint_command(c: argparse.ArgumentParser, with_set: bool = True) -> None:
    c.add_argument("checkpoint", help="a prismkit .safetensors checkpoint")
    c.add_argument(
        "--labels", default="", help="label store folder (experts run on the fly otherwise)"
    )
    if with_set:
        add_set_argument(
            c,
            "override a field of the checkpoint's config, e.g. 'label_space=\"labels.safetensors\"'",
        )


def _configure_caption(c: argparse.ArgumentParser) -> None:
    _checkpoint_command(c)
    c.add_argument("images", nargs="+")
    c.add_argument(
        "--prompt", help="caption prompt (default: the config's; Prismer: text.caption_prompt)"
    )
    c.add_argument("--beams", type=int, help="default 3")
    c.add_argument(
        "--max-length",
        type=int,
        help="longest caption, prompt included (tokens; default 20, as Prismer and BLIP)",
    )
    c.add_argument(
        "--min-length",
        type=int,
        help="shortest caption, prompt included (tokens; default 8, BLIP 5)",
    )
    c.set_defaults(func=cmd_caption)


def _configure_ask(c: argparse.ArgumentParser) -> None:
    _checkpoint_command(c)
    c.add_argument("image")
    c.add_argument("question")
    c.add_argument(
        "--candidates", help="comma-separated answers to rank (closed-ended); omit to generate"
    )
    c.add_argument(
        "--k-test", type=int, default=None, help="rank the k best first tokens (default: all)"
    )
    c.set_defaults(func=cmd_ask)


def _configure_eval(c: argparse.ArgumentParser) -> None:
    _checkpoint_command(c, with_set=False)
    c.add_argument(
        "--run", help="run config TOML ([data] names the dataset, [eval] the beam settings)"
    )
    add_set_argument(c, "override a run field (data./eval.) or a field of the checkpoint's config")
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
