"""The ``prismkit`` command line. The core adds ``plugins``, ``configs`` and ``describe``; every
other command comes from a plugin's ``register_commands`` hook (the core names none of them)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prismkit.core import weights
from prismkit.core.config import ConfigError, ModelConfig, load_config, resolve_config
from prismkit.core.host import KINDS, PluginError, PluginHost, get_plugin_manager


@dataclass(frozen=True)
class Command:
    """A ``prismkit`` subcommand a plugin registers: ``configure(parser)`` adds its arguments and
    sets ``func`` (``parser.set_defaults(func=run)``, ``run(args) -> exit code``); nested
    subcommands add their own subparsers."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """The ``--set FIELD=VALUE`` option (repeatable) that every config-taking command shares."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=help or "override a config field, e.g. vision.image_size=480",
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    host = args.host
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
    print("\nComponents (name <- plugin; the core's commands: plugins, configs, describe):")
    for kind in KINDS:
        reg = getattr(host, kind)
        print(f"  {kind:<19} " + (", ".join(f"{n} <- {reg.owner(n)}" for n in reg.names()) or "-"))
    return 0


def describe(config: ModelConfig, host: PluginHost) -> str:
    """Architecture summary and exact parameter counts, built on the meta device (no weights)."""
    with torch.device("meta"):
        model = host.architectures.get(config.architecture).from_config(config, host)
    lines = [f"{config.name}: {model.describe_title()}"]
    vc, lc = config.vision, config.language
    lines.append(
        f"  vision   {vc.backbone} {vc.width}w x {vc.layers}L x {vc.heads}h, stem {vc.stem}, {vc.image_size}px / {vc.patch_size} -> {(vc.image_size // vc.patch_size) ** 2} tokens ({vc.pretrained or 'random init'})"
    )
    lines.append(
        f"  language {lc.backbone} {lc.width}w x {lc.layers}L x {lc.heads}h, vocab {lc.vocab_size} ({lc.pretrained or 'random init'})"
    )
    if config.experts:
        n_tok = (vc.image_size // vc.patch_size) ** 2
        slots = [host.expert(e) for e in config.experts]
        lines.append(
            f"  experts  {', '.join(f'{e.name}({e.kind},{e.channels}ch)' for e in slots)}: "
            f"{n_tok * len(slots)} expert tokens -> resampler {config.resampler.name} -> {config.resampler.latents}"
        )
    lines.append(f"  {'part':<24}{'trainable':>14}{'frozen':>14}")
    for label, mod in model.describe_parts():
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
    host = args.host
    print(describe(resolve_config(host, args.config, args.set), host))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    host = args.host
    for name, value in host.model_configs.items():
        print(f"{name:<20} {value}  <- {host.model_configs.owner(name)}")
    return 0


def _core_commands() -> list[Command]:
    def plugins(p: argparse.ArgumentParser) -> None:
        p.set_defaults(func=cmd_plugins)

    def configs(p: argparse.ArgumentParser) -> None:
        p.set_defaults(func=cmd_configs)

    def describe_(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="registered config name or path to a TOML file")
        add_set_argument(p)
        p.set_defaults(func=cmd_describe)

    return [
        Command(
            "plugins", "list loaded plugins, their hooks, experts, weights and components", plugins
        ),
        Command("configs", "list registered model configs", configs),
        Command(
            "describe",
            "architecture and exact parameter counts (no download, meta device)",
            describe_,
        ),
    ]


def build_parser(host: PluginHost) -> argparse.ArgumentParser:
    """The parser: the core's commands plus every command the loaded plugins registered."""
    parser = argparse.ArgumentParser(prog="prismkit", description=__doc__)
    parser.add_argument(
        "--plugins-toml",
        default=os.environ.get("PRISMKIT_PLUGINS"),
        help="plugins.toml to use (default: the packaged one)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    core = _core_commands()
    taken = {c.name for c in core}
    for cmd in core + [host.commands.get(n) for n in host.commands.names()]:
        if cmd in core or cmd.name not in taken:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
            cmd.configure(p)
        else:
            raise PluginError(
                f"plugin {host.commands.owner(cmd.name)!r} registers command {cmd.name!r}, which the core owns"
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugins-toml", default=os.environ.get("PRISMKIT_PLUGINS"))
    known, _ = pre.parse_known_args(argv)
    try:
        host = get_plugin_manager(known.plugins_toml)
        args = build_parser(host).parse_args(argv)
        args.host = host
        return args.func(args)
    except (ConfigError, PluginError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"prismkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
