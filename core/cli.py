"""The ``prismkit`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from prismkit.core import weights
from prismkit.core.config import ConfigError, ModelConfig, load_config
from prismkit.core.host import PluginError, PluginHost, get_plugin_manager


def resolve_config(
    host: PluginHost, name_or_path: str, overrides: list[str] | None = None
) -> ModelConfig:
    """A registered config name or a TOML path -> ModelConfig."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and name_or_path in host.model_configs:
        value = host.model_configs.get(name_or_path)
        if isinstance(value, ModelConfig):
            return value
        path = Path(value)
    elif path.suffix != ".toml":
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a .toml file; registered: {', '.join(host.model_configs.names())}"
        )
    return load_config(path, overrides)


def cmd_plugins(args: argparse.Namespace) -> int:
    host = get_plugin_manager(args.plugins_toml)
    print("Plugins:")
    for p in host.plugins:
        print(f"  {p.name:<12} {p.distribution} {p.version}  ({p.module})")
        print(f"  {'':<12} hooks: {', '.join(p.hooks)}")
    for name, why in host.skipped.items():
        print(f"  {name:<12} NOT LOADED: {why}")
    print("\nExperts (kind, channels, requires; weights):")
    for name, cls in host.experts.items():
        st = cls().weights_status()
        enabled = host.enabled_experts is None or name in host.enabled_experts
        print(
            f"  {name:<15} {cls.kind:<8} {cls.channels:>3}  requires={list(cls.requires)}  "
            f"[{'available' if st.available else 'MISSING'}: {st.where}]{'' if enabled else '  (disabled)'}  <- {host.experts.owner(name)}"
        )
    print("\nBackbones and weights of the registered configs:")
    for name, value in host.model_configs.items():
        cfg = value if isinstance(value, ModelConfig) else load_config(value)
        for part, src in (("vision", cfg.vision.pretrained), ("language", cfg.language.pretrained)):
            if src:
                st = weights.status(src)
                print(
                    f"  {name:<18} {part:<8} {src}: {'available' if st.available else 'MISSING'} ({st.where})"
                )
        stem = host.image_stems.get(cfg.vision.stem)
        if stem.default_pretrained or cfg.vision.stem_pretrained:
            src = cfg.vision.stem_pretrained or stem.default_pretrained
            st = weights.status(src)
            print(
                f"  {name:<18} {'stem':<8} {src}: {'available' if st.available else 'MISSING'} ({st.where})"
            )
    print("\nComponents:")
    for kind in (
        "image_stems",
        "vision_backbones",
        "language_backbones",
        "adaptors",
        "resamplers",
        "heads",
    ):
        reg = getattr(host, kind)
        print(f"  {kind:<19} " + ", ".join(f"{n} <- {reg.owner(n)}" for n in reg.names()))
    return 0


def describe(config: ModelConfig, host: PluginHost) -> str:
    """Architecture summary and exact parameter counts, built on the meta device (no weights)."""
    from prismkit.core.model import PrismerModel

    with torch.device("meta"):
        model = PrismerModel.from_config(config, host)
    lines = [f"{config.name}: {'PrismerZ (RGB only)' if config.is_prismerz else 'Prismer'}"]
    vc, lc = config.vision, config.language
    lines.append(
        f"  vision   {vc.backbone} {vc.width}w x {vc.layers}L x {vc.heads}h, stem {vc.stem}, {vc.image_size}px / {vc.patch_size} -> {(vc.image_size // vc.patch_size) ** 2} tokens ({vc.pretrained or 'random init'})"
    )
    lines.append(
        f"  language {lc.backbone} {lc.width}w x {lc.layers}L x {lc.heads}h, vocab {lc.vocab_size} ({lc.pretrained or 'random init'})"
    )
    if model.experts:
        n_tok = (vc.image_size // vc.patch_size) ** 2
        lines.append(
            f"  experts  {', '.join(f'{e.name}({e.kind},{e.channels}ch)' for e in model.experts)}: "
            f"{n_tok * len(model.experts)} expert tokens -> resampler {config.resampler.name} -> {config.resampler.latents}"
        )
    rows = [
        ("vision backbone", model.vision),
        ("language backbone", model.language),
        ("expert stems", model.expert_stems),
        ("resampler", model.resampler),
        ("vision->language proj", model.vision_proj),
    ]
    lines.append(f"  {'part':<24}{'trainable':>14}{'frozen':>14}")
    for label, mod in rows:
        if mod is None:
            continue
        t = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        f = sum(p.numel() for p in mod.parameters() if not p.requires_grad)
        lines.append(f"  {label:<24}{t:>14,}{f:>14,}")
    counts = model.parameter_counts()
    lines.append(
        f"  {'total':<24}{counts['trainable']:>14,}{counts['frozen']:>14,}   ({counts['total']:,} parameters, "
        f"{100 * counts['trainable'] / counts['total']:.1f}% trainable)"
    )
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    host = get_plugin_manager(args.plugins_toml)
    print(describe(resolve_config(host, args.config, args.set), host))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    host = get_plugin_manager(args.plugins_toml)
    for name, value in host.model_configs.items():
        print(f"{name:<20} {value}  <- {host.model_configs.owner(name)}")
    return 0


RUN_PREFIXES = ("train.", "data.", "eval.")
# subcommands that own their argument parsing: module with main(argv), and a help line
PASSTHROUGH = {
    "bench": ("prismkit.core.bench", "speed/memory benchmark: prints tables, writes JSON"),
    "demo": ("prismkit.core.demo", "the embedded offline run: Prismer vs PrismerZ on easy-vqa"),
}


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the run config (train./data./eval.) and for the model config."""
    run = [i for i in items if i.startswith(RUN_PREFIXES)]
    return run, [i for i in items if not i.startswith(RUN_PREFIXES)]


def cmd_train(args: argparse.Namespace) -> int:
    from prismkit.core.train import TrainConfig, load_run_config, train

    host = get_plugin_manager(args.plugins_toml)
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


def _toml(value: object) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def _predictor(args: argparse.Namespace):
    from prismkit.core.checkpoint import load_checkpoint
    from prismkit.core.evaluate import Predictor
    from prismkit.core.processor import Processor
    from prismkit.core.train import ExpertFeeder

    host = get_plugin_manager(args.plugins_toml)
    model = load_checkpoint(args.checkpoint, host).eval()
    return Predictor(
        model,
        Processor.from_config(model.config),
        ExpertFeeder(model, host, getattr(args, "labels", ""), compute_missing=True),
    ), host


def cmd_caption(args: argparse.Namespace) -> int:
    from prismkit.core.generation import BeamConfig

    pred, _ = _predictor(args)
    cfg = BeamConfig(beams=args.beams, max_length=args.max_length, min_length=args.min_length)
    for path, cap in zip(args.images, pred.caption(args.images, args.prompt, cfg), strict=True):
        print(f"{path}\t{cap}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    pred, _ = _predictor(args)
    candidates = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    print(pred.answer([args.image], [args.question], candidates)[0])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prismkit.core.evaluate import evaluate_datasets
    from prismkit.core.train import load_run_config

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
        from prismkit.core.checkpoint import atomic_write

        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from prismkit.core.train import TrainConfig

    parser = argparse.ArgumentParser(prog="prismkit", description=__doc__)
    parser.add_argument(
        "--plugins-toml",
        default=os.environ.get("PRISMKIT_PLUGINS"),
        help="plugins.toml to use (default: the packaged one)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "plugins", help="list loaded plugins, their hooks, experts and weights"
    ).set_defaults(func=cmd_plugins)
    sub.add_parser("configs", help="list registered model configs").set_defaults(func=cmd_configs)
    # commands with their own argument parsers: `prismkit bench --help`, `prismkit demo --help`
    for name, (_, helptext) in PASSTHROUGH.items():
        sub.add_parser(name, help=helptext, add_help=False)
    d = sub.add_parser(
        "describe", help="architecture and exact parameter counts (no download, meta device)"
    )
    d.add_argument("config", help="registered config name or path to a TOML file")
    d.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. vision.image_size=480",
    )
    d.set_defaults(func=cmd_describe)
    t = sub.add_parser(
        "train", help="train a model config on a dataset (accelerate: one CPU to many GPUs)"
    )
    t.add_argument("config", nargs="?", default="offline_default", help="model config name or TOML")
    t.add_argument("--run", help="run config TOML with [data], [train], [eval] tables")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field: model fields (vision.width=...) or train./data./eval. fields",
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
    for name, func, helptext in (
        ("caption", cmd_caption, "caption images with a checkpoint"),
        ("ask", cmd_ask, "answer a question about an image"),
        ("eval", cmd_eval, "evaluate a checkpoint on a dataset"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("checkpoint", help="a prismkit .safetensors checkpoint")
        c.add_argument(
            "--labels", default="", help="label store folder (experts run on the fly otherwise)"
        )
        c.set_defaults(func=func)
        if name == "caption":
            c.add_argument("images", nargs="+")
            c.add_argument("--prompt", default="a picture of")
            c.add_argument("--beams", type=int, default=3)
            c.add_argument("--max-length", type=int, default=20)
            c.add_argument("--min-length", type=int, default=8)
        elif name == "ask":
            c.add_argument("image")
            c.add_argument("question")
            c.add_argument(
                "--candidates",
                help="comma-separated answers to rank (closed-ended); omit to generate",
            )
        else:
            c.add_argument(
                "--run", help="run config TOML ([data] names the dataset, [eval] the beam settings)"
            )
            c.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
            c.add_argument(
                "--limit", type=int, default=None, help="evaluate only the first N samples"
            )
            c.add_argument("--out", help="write the metrics JSON here")
    from prismkit.core.capfilt import add_commands as add_capfilt_commands
    from prismkit.core.muvla import add_commands as add_muvla_commands
    from prismkit.experts.commands import add_commands as add_experts_commands

    add_experts_commands(sub)
    add_capfilt_commands(sub)
    add_muvla_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PluginError, FileNotFoundError, ValueError) as e:
        print(f"prismkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
