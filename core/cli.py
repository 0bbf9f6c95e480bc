"""The ``prismkit`` command line. The core adds ``plugins``, ``configs`` and ``describe``; every
other command comes from a plugin's ``register_commands`` hook (the core names none of them)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prismkit.core import weights
from prismkit.core.config import ConfigError, ModelConfig, load_config, resolve_config
from prismkit.core.host import KINDS, PluginError, PluginHost, get_plugin_manager


@dataclass(frozen=True)
class Command:
    """A ``prismkit`` subcommand a plugin registers: ``configure(parser)`` adds its arguments and
    sets ``func`` (``parser.set_defaults(func=run)``, ``run(args) -> exit code``); nested
    subcommands add their own subparsers. A name with a space adds a subcommand to a group:
    ``Command("convert blip", ...)`` is ``prismkit convert blip`` (the core owns ``convert``).
    ``configure=None`` makes a group of its own."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | None


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
        size = getattr(model, "expert_size", vc.image_size)
        n_tok = (size // vc.patch_size) ** 2
        slots = [host.expert(e) for e in config.experts]
        lines.append(
            f"  experts  {', '.join(f'{e.name}({e.kind},{e.channels}ch)' for e in slots)} at "
            f"{size}px: {n_tok * len(slots)} expert tokens -> resampler "
            f"{config.resampler.name} -> {config.resampler.latents}"
        )
    lines.append(f"  {'part':<24}{'trainable':>14}{'frozen':>14}")
    for label, part in model.describe_parts():
        params = (
            []
            if part is None
            else [part]
            if isinstance(part, nn.Parameter)
            else list(part.parameters())
        )
        if not params:
            continue
        t = sum(p.numel() for p in params if p.requires_grad)
        f = sum(p.numel() for p in params if not p.requires_grad)
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


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """``prismkit convert prismer``'s arguments."""
    p.add_argument("checkpoint", nargs="?", help="official state dict (.bin / .pt / .safetensors)")
    p.add_argument("--out", required=True, help="output folder (checkpoint) or file (--fixture)")
    p.add_argument("--fixture", help="a reference fixture folder: compute its outputs into --out")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="the checkpoint's resolution (default: 224 or 480, whichever gives its grid)",
    )
    p.add_argument("--seg-expert", default="seg_coco", help="the expert behind the 'seg' stem")
    p.add_argument("--vision-heads", type=int, default=None, help="default: width / 64")
    p.add_argument("--language-heads", type=int, default=None, help="default: width / 64")
    p.add_argument("--name", default="", help="config name (default: the checkpoint's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from prismkit.core.convert import Heads, convert_prismer
    from prismkit.core.io import atomic_write

    if args.fixture:
        from safetensors.torch import save_file

        from prismkit.core.parity import run_fixture

        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
        outputs = run_fixture(args.fixture, args.host)
        atomic_write(
            out, lambda tmp: save_file(outputs, tmp, metadata={"fixture": str(args.fixture)})
        )
        print(f"wrote {len(outputs)} outputs of {args.fixture} to {out}")
        return 0
    if not args.checkpoint:
        raise ValueError("give an official CHECKPOINT to convert, or --fixture DIR")
    target = convert_prismer(
        args.checkpoint,
        args.out,
        host=args.host,
        heads=Heads(args.vision_heads, args.language_heads),
        image_size=args.image_size,
        seg_expert=args.seg_expert,
        name=args.name,
        overwrite=args.overwrite,
    )
    print(f"wrote {target} and {target.parent / 'config.toml'}")
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
        Command("convert", "convert official checkpoints and reference fixtures to prismkit", None),
        Command(
            "convert prismer",
            "an official Prismer/PrismerZ checkpoint -> a prismkit checkpoint + config "
            "(or --fixture: recompute a reference fixture's outputs)",
            add_convert_arguments,
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
    groups = {(): parser.add_subparsers(dest="command", required=True)}
    core = _core_commands()
    taken = {c.name for c in core}
    commands = core + [host.commands.get(n) for n in host.commands.names()]
    for cmd in sorted(commands, key=lambda c: len(c.name.split())):
        if cmd not in core and cmd.name in taken:
            raise PluginError(
                f"plugin {host.commands.owner(cmd.name)!r} registers command {cmd.name!r}, which the core owns"
            )
        *parent, leaf = cmd.name.split()
        if tuple(parent) not in groups:
            raise PluginError(
                f"command {cmd.name!r} (plugin {host.commands.owner(cmd.name)!r}) needs a command group {' '.join(parent)!r}, which no plugin registers"
            )
        p = groups[tuple(parent)].add_parser(leaf, help=cmd.help, description=cmd.help)
        if cmd.configure is None:
            groups[(*parent, leaf)] = p.add_subparsers(
                dest="_".join([*parent, leaf]) + "_command", required=True
            )
        else:
            cmd.configure(p)
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
    except (ConfigError, PluginError, OSError, ValueError) as e:
        # bad input (configs, flags, files, datasets): one line naming it, never a traceback
        print(f"prismkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prismkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
