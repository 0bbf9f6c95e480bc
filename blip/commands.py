"""BLIP's commands: prismkit capfilt and prismkit retrieval."""

from __future__ import annotations

import argparse

from prismkit.blip.capfilt import capfilt, read_pairs, summary
from prismkit.core.checkpoint import load_checkpoint
from prismkit.core.cli import Command
from prismkit.core.data import CAPTION_PROMPT
from prismkit.core.hookspecs import hookimpl


def cmd_capfilt(args: argparse.Namespace) -> int:
    host = args.host
    history = capfilt(
        args.data,
        args.captioner,
        args.filter,
        args.out,
        host,
        human=args.human,
        rounds=args.rounds,
        threshold=args.threshold,
        prompt=args.prompt,
        top_p=args.top_p,
        max_length=args.max_length,
        min_length=args.min_length,
        batch_size=args.batch_size,
        seed=args.seed,
        image_root=args.image_root,
    )
    human = len(read_pairs(args.human, "human", args.image_root)) if args.human else 0
    print(summary(history, human))
    print(f"wrote {args.out}")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from prismkit.blip.retrieval import retrieval_eval
    from prismkit.core.processor import Processor

    host = args.host
    model = load_checkpoint(args.checkpoint, host).eval()
    pairs = read_pairs(args.data, "test", args.image_root)
    images = list(dict.fromkeys(q.image for q in pairs))
    index = {im: i for i, im in enumerate(images)}
    metrics = retrieval_eval(
        model,
        Processor.from_config(model.config),
        images,
        [q.caption for q in pairs],
        k_test=args.k_test,
        text_image=[index[q.image] for q in pairs],
    )
    for k, v in metrics.items():
        print(f"{k:<10}{v:>8.2f}")
    return 0


def _configure_capfilt(c: argparse.ArgumentParser) -> None:
    c.add_argument("data", help='JSONL of {"image": path, "caption": web caption}')
    c.add_argument("--captioner", required=True, help="captioner checkpoint (.safetensors)")
    c.add_argument("--filter", required=True, help="filter checkpoint (head 'blip')")
    c.add_argument("--out", required=True, help="output JSONL")
    c.add_argument("--human", help="JSONL of human-annotated pairs, appended unfiltered")
    c.add_argument("--rounds", type=int, default=1, help="caption + filter rounds (no retraining)")
    c.add_argument(
        "--threshold", type=float, default=0.5, help="keep pairs with ITM p(match) >= this"
    )
    c.add_argument("--prompt", default=CAPTION_PROMPT)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--max-length", type=int, default=20)
    c.add_argument("--min-length", type=int, default=5)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--image-root", help="folder of relative image paths (default: the file's)")
    c.set_defaults(func=cmd_capfilt)


def _configure_retrieval(r: argparse.ArgumentParser) -> None:
    r.add_argument("checkpoint", help="a 'blip' checkpoint (.safetensors)")
    r.add_argument(
        "data", help='JSONL of {"image": path, "caption": str} (several per image allowed)'
    )
    r.add_argument("--k-test", type=int, default=16, help="ITC candidates re-ranked by ITM")
    r.add_argument("--image-root", help="folder of relative image paths (default: the file's)")
    r.set_defaults(func=cmd_retrieval)


@hookimpl
def register_commands(register) -> None:
    register(
        Command(
            "capfilt",
            "BLIP CapFilt: caption web images, filter captions with ITM, write JSONL",
            _configure_capfilt,
        )
    )
    register(
        Command(
            "retrieval", "image-text retrieval R@1/5/10 of a blip checkpoint", _configure_retrieval
        )
    )
