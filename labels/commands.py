"""``prismkit experts run|show|fit-pca``: precompute labels, draw them, fit the label PCA."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from prismkit.core.cli import Command
from prismkit.core.expert import Expert
from prismkit.core.hookspecs import hookimpl
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.labels.embedding import (
    DEFAULT_DIM,
    DEFAULT_ENCODER,
    DEFAULT_RANDOM_STATE,
    cmd_fit_pca,
)


def default_device() -> str:
    """``cuda:$LOCAL_RANK`` (torchrun / accelerate set it; 0 otherwise) when CUDA is available,
    else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def select_experts(host: PluginHost, names: str | None, device: str) -> dict[str, Expert]:
    """Experts to run, keyed by name, in plugins.toml order.

    ``names``: comma-separated expert names; the experts they ``require`` are added. ``None``:
    every enabled expert whose weights are available here (the others are listed on stderr).
    """
    if names is None:
        enabled = host.enabled_experts or host.experts.names()
        chosen = []
        for n in enabled:
            status = host.expert(n)().weights_status()
            if status.available:
                chosen.append(n)
            else:
                print(f"skipping expert {n!r}: weights missing ({status.where})", file=sys.stderr)
        dropped = True
        while dropped:  # drop experts whose requirements cannot run
            unmet = {n: [r for r in host.expert(n).requires if r not in chosen] for n in chosen}
            dropped = any(unmet.values())
            for n, missing in unmet.items():
                if missing:
                    chosen.remove(n)
                    print(f"skipping expert {n!r}: it requires {missing}", file=sys.stderr)
    else:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        if not chosen:
            raise ValueError("--experts names no expert")
    experts: dict[str, Expert] = {}
    queue = list(chosen)
    while queue:
        n = queue.pop(0)
        if n in experts:
            continue
        cls = host.expert(n)
        if n not in chosen:
            print(f"adding expert {n!r}: required by the experts asked for", file=sys.stderr)
        e = cls(device=device)
        status = e.weights_status()
        if not status.available:
            raise ValueError(f"expert {n!r} cannot run here: weights missing ({status.where})")
        experts[n] = e
        queue.extend(cls.requires)
    if not experts:
        raise ValueError(
            "no expert has its weights here; pass --experts NAME,... (prismkit plugins lists them)"
        )
    return experts


def _host(args: argparse.Namespace) -> PluginHost:
    return getattr(args, "host", None) or get_plugin_manager(getattr(args, "plugins_toml", None))


def cmd_run(args: argparse.Namespace) -> int:
    from prismkit.labels.runner import parse_shard, run_experts
    from prismkit.labels.store import LabelStore

    experts = select_experts(_host(args), args.experts, args.device or default_device())
    shard = parse_shard(args.shard)
    store = LabelStore(args.store, args.size)
    more = f" (+{len(args.inputs) - 3} more)" if len(args.inputs) > 3 else ""
    print(
        f"labelling {', '.join(args.inputs[:3])}{more} with {', '.join(experts)} into {store} "
        f"(shard {shard[0]}/{shard[1]}, {args.workers} worker(s), batch {args.batch_size})"
    )
    if args.batch_size < 1 or args.workers < 1:
        raise ValueError(
            f"--batch-size and --workers must be at least 1; got {args.batch_size}, {args.workers}"
        )
    if args.shards:
        if args.verify:
            raise ValueError(
                "--verify checks a per-image store; shard label files are checked (sha256 of "
                "every sample) whenever training reads them: drop --verify"
            )
        from prismkit.labels.shard_runner import run_experts_on_shards
        from prismkit.labels.shard_store import ShardLabelStore

        report = run_experts_on_shards(
            args.inputs,
            experts,
            ShardLabelStore(args.store, args.size),
            args.batch_size,
            args.workers,
            shard=shard,
        )
    else:
        report = run_experts(
            args.inputs,
            experts,
            store,
            args.batch_size,
            args.workers,
            shard=shard,
            verify=args.verify,
        )
    print(report.summary())
    return 1 if report.failures else 0


def cmd_show(args: argparse.Namespace) -> int:
    from prismkit.labels.gallery import render_gallery
    from prismkit.labels.store import LabelStore

    experts = select_experts(_host(args), args.experts, args.device or default_device())
    store = LabelStore(args.store, args.size) if args.store else None
    failures = render_gallery(args.images, experts, args.output, store=store, size=args.size)
    print(f"wrote {args.output}: {len(args.images)} image(s) x {len(experts)} expert(s)")
    return 1 if failures else 0


def _configure(p: argparse.ArgumentParser) -> None:
    """``experts run|show|fit-pca``."""
    sub = p.add_subparsers(dest="experts_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--experts",
            default=None,
            metavar="NAME,...",
            help="experts to run (their requirements are added); default: every enabled expert "
            "whose weights are here",
        )
        q.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK if any, else cpu")

    r = sub.add_parser("run", help="precompute labels into a label store (resumable, sharded)")
    r.add_argument(
        "inputs",
        nargs="+",
        help="image files or folders (searched recursively); with --shards: shards",
    )
    r.add_argument("--store", required=True, type=Path, help="label store folder")
    common(r)
    r.add_argument("--batch-size", type=int, default=8, help="images per expert call")
    r.add_argument("--workers", type=int, default=1, help="processes on this machine")
    r.add_argument(
        "--shard",
        default=None,
        metavar="RANK/WORLD",
        help="label images[RANK::WORLD]; default: $RANK/$WORLD_SIZE (torchrun, accelerate) or all",
    )
    r.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize images to SIZE x SIZE first; default: native resolution, equal sizes batched",
    )
    r.add_argument(
        "--verify",
        action="store_true",
        help="check the checksum of every stored label file of these images and recompute the "
        "damaged ones (without it, only truncated files are caught)",
    )
    r.add_argument(
        "--shards",
        action="store_true",
        help="the inputs are webdataset shards (paths, brace patterns such as "
        "'cc3m/{000000..000331}.tar', pipe: commands): labels go into one file per shard and "
        "expert, read by the streaming reader during training (resumable shard by shard)",
    )
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("show", help="draw each image beside every expert's map")
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("-o", "--output", type=Path, default=Path("gallery.png"))
    common(s)
    s.add_argument("--store", type=Path, default=None, help="read labels from this store")
    s.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE first")
    s.set_defaults(func=cmd_show)

    f = sub.add_parser("fit-pca", help="fit the 64-d PCA of label-name text embeddings")
    f.add_argument("-o", "--output", type=Path, default=Path("label_pca.safetensors"))
    f.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help="text encoder: package:..., hub id or folder (CLIP checkpoints use the text tower)",
    )
    f.add_argument("--dim", type=int, default=DEFAULT_DIM)
    f.add_argument("--seed", type=int, default=DEFAULT_RANDOM_STATE, help="PCA random_state")
    f.add_argument("--words", default=None, help="text file of extra label names, one per line")
    f.set_defaults(func=cmd_fit_pca)


def _configure_label_space(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder", type=Path, help="the reference's dataset/ folder (*_features.pt, clip_pca.pkl)"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="label space file (.safetensors) to write"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_convert_label_space)


def cmd_convert_label_space(args: argparse.Namespace) -> int:
    from prismkit.labels.prismer_space import convert_label_space

    out = convert_label_space(args.folder, args.out, args.overwrite)
    print(
        f"wrote {out}: the reference's label tables, background vector and PCA (read with "
        "torch.load(weights_only=True) and an allow-list parser; no pickle code ran). Use it with "
        f"--set 'label_space=\"{out}\"'"
    )
    return 0


@hookimpl
def register_commands(register) -> None:
    register(Command("experts", "precompute, show and embed expert labels", _configure))
    register(
        Command(
            "convert prismer-labels",
            "Prismer's label features (dataset/*_features.pt, clip_pca.pkl) -> one safetensors file",
            _configure_label_space,
        )
    )
