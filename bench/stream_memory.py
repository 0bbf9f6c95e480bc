"""Streaming from shards: peak memory against corpus size, and loader throughput against the
BASE training step.

1. Synthetic corpora of 1k, 10k and 100k image + caption samples are written as webdataset
   shards (``--per-shard`` samples each, ``--image-px`` JPEGs of smooth random shapes, a
   ``.json`` caption) under ``--root`` (``/tmp`` by default; not part of the repository; reused
   when already there).
2. For each corpus, ``prismkit train tiny`` streams ``--steps`` steps (``webdataset_stream``, 2
   loader workers, batch ``--batch``; 30 x 64 = 1920 samples: two epochs of the 1k corpus, a part
   of the others) in a fresh process; the resident memory of the run (the training process, and
   the sum over it and its loader workers) is sampled every 50 ms and its peak kept. What could
   grow with the corpus (shard lists, epoch plans, the shuffle buffer, the resume position) is
   built before the first step, so the same number of steps compares the sizes. With
   ``--in-memory`` the map-style ``webdataset`` reader (every sample decoded into memory first)
   is measured too, on the corpora of at most ``--in-memory-max`` samples, for contrast.
3. Loader throughput: the stream of the 10k corpus (or the largest below it) decoded at the BASE
   image size (224 px) with the ``edge`` expert's labels streamed from a shard label store, for
   0, 1 and 2 loader workers (samples per second through ``StreamFeed``, no model), against the
   measured BASE step (``prismer_base`` and ``prismerz_base`` in ``bench/results-cpu-full.json``).

    python -m prismkit.bench.stream_memory --in-memory   # 1k, 10k, 100k (~10 min on 2 cores)
    python -m prismkit.bench.stream_memory --sizes 1000 10000 --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
WORDS = (
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "shape",
    "small",
    "large",
)


def synthetic_jpeg(rng: np.random.Generator, px: int) -> bytes:
    """A ``px`` x ``px`` JPEG (quality 90): a colour gradient with a few filled shapes."""
    from PIL import Image, ImageDraw

    base = np.linspace(0, 1, px, dtype=np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    grad = (c0[None, None] * base[:, None, None] + c1[None, None] * base[None, :, None]) / 2
    im = Image.fromarray(np.broadcast_to(grad, (px, px, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.integers(0, px - 8, 2)
        w, h = rng.integers(8, px // 2, 2)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_corpus(root: Path, n: int, per_shard: int = 1000, px: int = 256, seed: int = 0) -> str:
    """``n`` samples in ``ceil(n / per_shard)`` shards under ``root/<n>/`` (kept when complete);
    returns the brace pattern."""
    import webdataset as wds

    folder = root / str(n)
    shards = math.ceil(n / per_shard)
    pattern = str(folder / f"{{000000..{shards - 1:06d}}}.tar")
    done = folder / "DONE"
    if done.exists() and done.read_text() == f"{n} {per_shard} {px} {seed}":
        return pattern
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    i = 0
    for s in range(shards):
        tmp = folder / f".{s:06d}.tar.tmp"
        with wds.TarWriter(str(tmp)) as w:
            for _ in range(min(per_shard, n - i)):
                caption = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 5))
                meta = {"caption": f"a {caption}", "url": f"synthetic://{i}"}
                w.write(
                    {
                        "__key__": f"{i:09d}",
                        "jpg": synthetic_jpeg(rng, px),
                        "json": json.dumps(meta).encode(),
                    }
                )
                i += 1
        os.replace(tmp, folder / f"{s:06d}.tar")
    done.write_text(f"{n} {per_shard} {px} {seed}")
    return pattern


class TreeMemory:
    """Peak resident memory of a process and its descendants, sampled every ``every`` s."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every, self.peak_main, self.peak_tree = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                tree = main
                for c in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        tree += c.memory_info().rss
            except psutil.NoSuchProcess:
                break
            self.peak_main, self.peak_tree = max(self.peak_main, main), max(self.peak_tree, tree)
            time.sleep(self.every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_main_mib": round(self.peak_main / 2**20, 1),
            "peak_rss_all_processes_mib": round(self.peak_tree / 2**20, 1),
        }


def train_run(
    pattern: str, n: int, out: Path, steps: int, batch: int, workers: int, in_memory: bool
) -> dict[str, Any]:
    """``prismkit train tiny`` for ``steps`` steps on the corpus in a fresh process; its peak
    memory."""
    if in_memory:
        options = f'data.options={{shards=["{pattern}"]}}'
        dataset = 'data.dataset="webdataset"'
    else:
        options = f'data.options={{shards="{pattern}", shuffle_buffer=1000}}'
        dataset = 'data.dataset="webdataset_stream"'
    cmd = [
        sys.executable, "-m", "prismkit.core.cli", "train", "tiny",
        "--set", dataset, "--set", options, "--set", f"data.workers={workers}",
        "--set", 'data.validate="off"',
        "--steps", str(steps), "--batch-size", str(batch), "--eval-questions", "0",
        "--save-every", "0", "--log-every", "100000", "--overwrite", "--out-dir", str(out),
    ]  # fmt: skip
    if in_memory:  # the map-style path decodes every image up front; no loader workers
        cmd[cmd.index(f"data.workers={workers}")] = "data.workers=0"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    peaks = mem.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"train over {n} samples failed:\n{stderr[-2000:]}")
    result = json.loads((out / "result.json").read_text())
    return {
        "samples": n,
        "reader": "webdataset (in memory)" if in_memory else "webdataset_stream",
        "steps": result["steps"],
        "batch": batch,
        "workers": 0 if in_memory else workers,
        "wall_s": round(time.time() - t0, 1),
        "train_seconds": result["train_seconds"],
        **peaks,
        "ru_maxrss_main_mib": result["peak_rss_mib"],
        "stream": result.get("stream"),
    }


def loader_throughput(
    pattern: str, labels: Path | None, image_size: int, batch: int, workers: int, limit: int
) -> dict[str, Any]:
    """Samples per second through ``StreamFeed`` (decode, resize, labels) without a model."""
    import torch

    from prismkit.core.host import get_plugin_manager
    from prismkit.datasets.stream import WebDatasetStream
    from prismkit.engine.stream import StreamFeed
    from prismkit.labels.shard_store import StreamLabels

    torch.set_num_threads(1)
    edge = get_plugin_manager().expert("edge")
    data = WebDatasetStream(shards=pattern, shuffle_buffer=1000)
    feed = StreamFeed(
        data, rank=0, world=1, workers=workers, batch_size=batch, image_size=image_size,
        reduce_sum=lambda t: t, labels=StreamLabels(labels, [edge]) if labels else None,
    )  # fmt: skip
    fed = feed.next(0)  # start-up (worker fork, shuffle buffer fill) not counted
    n, t0 = 0, time.perf_counter()
    while n < limit and feed.epoch == 0:
        fed = feed.next(0)
        n += len(fed.keys)
    seconds = time.perf_counter() - t0
    assert (fed.labels is not None) == (labels is not None) and fed.pixels.shape[-1] == image_size
    return {
        "workers": workers,
        "samples": n,
        "seconds": round(seconds, 2),
        "samples_per_s": round(n / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--root", type=Path, default=Path("/tmp/prismkit-stream-bench"))
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--in-memory", action="store_true", help="also the in-memory reader")
    p.add_argument("--in-memory-max", type=int, default=1000, help="largest corpus for it")
    p.add_argument("--throughput-samples", type=int, default=2000)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-labels", action="store_true", help="throughput without streamed labels")
    p.add_argument("--out", type=Path, default=HERE / "results-stream-cpu.json")
    args = p.parse_args(argv)
    from prismkit.core.processor import load_image  # noqa: F401 - fail early if not installed

    out: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "loadavg_1m_before": os.getloadavg()[0],
            "image_px": args.image_px,
            "per_shard": args.per_shard,
            "memory_method": "RSS of the training process and of it plus its loader workers, "
            "sampled every 50 ms (psutil); the sum counts pages shared with forked workers once "
            "per process",
        },
        "memory": [],
        "throughput": {},
    }
    patterns = {}
    for n in args.sizes:
        t0 = time.time()
        patterns[n] = make_corpus(args.root, n, args.per_shard, args.image_px)
        print(f"corpus {n}: {patterns[n]} ({time.time() - t0:.0f}s)", flush=True)
    if not args.skip_memory:
        for n in args.sizes:
            runs = [False] + ([True] if args.in_memory and n <= args.in_memory_max else [])
            for in_memory in runs:
                r = train_run(
                    patterns[n],
                    n,
                    args.root / f"run-{n}",
                    args.steps,
                    args.batch,
                    args.workers,
                    in_memory,
                )
                out["memory"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "stream"}), flush=True)
    n = max([s for s in args.sizes if s <= 10000] or [min(args.sizes)])
    labels = None if args.no_labels else args.root / f"labels-{n}"
    if labels is not None:
        subprocess.run(
            [sys.executable, "-m", "prismkit.core.cli", "experts", "run", "--shards", patterns[n],
             "--store", str(labels), "--experts", "edge", "--device", "cpu", "--size", "224",
             "--workers", str(args.workers), "--batch-size", "32"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    rows = [
        loader_throughput(patterns[n], labels, 224, 32, w, args.throughput_samples)
        for w in range(args.workers + 1)
    ]
    base = json.loads((HERE / "results-cpu-full.json").read_text())["base_shapes"]["train"]
    out["throughput"] = {
        "corpus": n,
        "image_size": 224,
        "batch": 32,
        "labels": "none" if labels is None else "edge expert, 224 px, from a shard label store",
        "loader": rows,
        "base_step": [
            {k: r[k] for k in ("config", "batch", "step_s", "samples_per_s")} for r in base
        ],
    }
    for r in rows:
        print(json.dumps(r), flush=True)
    out["meta"]["loadavg_1m_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
