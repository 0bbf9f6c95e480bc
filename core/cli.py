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


def cmd_train(args: argparse.Namespace) -> int:
    from prismkit.core.train import TrainConfig, train

    host = get_plugin_manager(args.plugins_toml)
    cfg = TrainConfig(
        **{
            f.name: getattr(args, f.name)
            for f in fields(TrainConfig)
            if getattr(args, f.name) is not None
        }
    )
    result = train(resolve_config(host, args.config, args.set), cfg, host)
    print(json.dumps(result, indent=2))
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
    t = sub.add_parser("train", help="short training run on easy-vqa, then a checkpoint")
    t.add_argument("config", nargs="?", default="offline_default")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    for f in fields(TrainConfig):
        t.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(getattr(TrainConfig(), f.name)),
            default=None,
        )
    t.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PluginError, FileNotFoundError, ValueError) as e:
        print(f"prismkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
