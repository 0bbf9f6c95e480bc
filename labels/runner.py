"""Precompute expert labels into a ``LabelStore``: resumable, sharded, parallel.

``run_experts`` lists images (recursively, sorted), takes this machine's shard
(``paths[rank::world]``), splits it again across ``num_workers`` spawned processes
(``shard[i::num_workers]``) and, in each, streams the images:

- an image whose labels the store already has for every expert (same content hash, same expert
  version, same size) is not even decoded: rerunning an interrupted run continues where it
  stopped, and an unchanged expert never recomputes;
- images are batched by equal size (``LabelStore(size=None)``: labels at the native resolution;
  mixed sizes form separate batches of up to ``batch_size``) or resized to ``S x S`` first
  (``LabelStore(size=S)``; bicubic, antialiased, as ``Processor.images``);
- experts run in dependency order (``requires``); a dependent reads exactly the stored
  (float16-rounded) labels of its requirements, whether they were computed now or earlier;
- an unreadable image or an expert that raises fails that image (for that expert and its
  dependents) with a message naming the file and the expert; the run goes on and reports every
  failure at the end. A batch that raises is retried image by image, so one bad image does not
  fail its neighbours.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.io import remove_stale_temporaries
from prismkit.core.progress import Progress
from prismkit.labels.store import LabelStore, roundtrip

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

Log = Callable[[str], None]


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files among ``inputs`` (files, or folders searched recursively for png / jpg / jpeg /
    bmp / webp / tif, any case), deduplicated and sorted by path."""
    found: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.update(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        elif p.is_file():
            found.add(p)
        else:
            raise FileNotFoundError(f"image or folder {p} does not exist")
    return sorted(found, key=lambda f: f.as_posix())


def parse_shard(text: str | None = None) -> tuple[int, int]:
    """``"RANK/WORLD"`` -> ``(rank, world)``. Without ``text``: the ``RANK`` / ``WORLD_SIZE``
    environment variables that torchrun and accelerate set, else ``(0, 1)``."""
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        text = f"{rank}/{world}"
    try:
        rank_s, world_s = text.split("/")
        rank, world = int(rank_s), int(world_s)
    except ValueError:
        raise ValueError(f"shard {text!r} must be RANK/WORLD, e.g. 0/4") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {text!r}: need 0 <= RANK < WORLD")
    return rank, world


def dependency_order(experts: dict[str, Expert]) -> list[str]:
    """Expert names so that each comes after the experts it ``requires``."""
    for name, e in experts.items():
        missing = [r for r in e.requires if r not in experts]
        if missing:
            raise ValueError(
                f"expert {name!r} requires {missing}, which this run does not include: add them "
                f"(--experts {','.join([*experts, *missing])})"
            )
    order: list[str] = []
    pending = list(experts)
    while pending:
        ready = [n for n in pending if all(r in order for r in experts[n].requires)]
        if not ready:
            raise ValueError(f"experts {pending} require each other in a cycle")
        order.extend(ready)
        pending = [n for n in pending if n not in ready]
    return order


@dataclass(frozen=True)
class Failure:
    """One image that could not be labelled (by ``expert``; ``None``: the image itself)."""

    image: str
    expert: str | None
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class RunReport:
    """What a run did."""

    # images in this shard
    images: int = 0
    # label files written
    computed: int = 0
    # (image, expert) pairs already in the store
    skipped: int = 0
    # what failed, with messages naming the image and the expert
    failures: list[Failure] = field(default_factory=list)
    # damaged label files found (truncated; with verify=True also checksum mismatches) and
    # recomputed
    repaired: list[str] = field(default_factory=list)
    # temporary files of killed earlier runs, deleted
    stale_removed: int = 0

    def merge(self, other: RunReport) -> RunReport:
        return RunReport(
            self.images + other.images,
            self.computed + other.computed,
            self.skipped + other.skipped,
            self.failures + other.failures,
            self.repaired + other.repaired,
            self.stale_removed + other.stale_removed,
        )

    def summary(self) -> str:
        lines = [
            f"{self.images} images: {self.computed} label files written, {self.skipped} already "
            f"stored, {len(self.failures)} failures"
        ]
        if self.repaired:
            lines.append(f"  {len(self.repaired)} damaged label file(s) recomputed:")
            lines += [f"    {r}" for r in self.repaired]
        if self.stale_removed:
            lines.append(f"  {self.stale_removed} temporary file(s) of killed runs deleted")
        lines += [f"  FAILED {f}" for f in self.failures]
        return "\n".join(lines)


@dataclass
class _Item:
    path: Path
    sha: str
    image: Tensor  # (3, H, W) in [0, 1]
    labels: dict[str, LabelMap] = field(default_factory=dict)  # as stored, batch of 1
    failed: set[str] = field(default_factory=set)
    todo: set[str] = field(default_factory=set)  # experts whose labels are to be computed


def resize_square(image: Tensor, size: int) -> Tensor:
    """``(3, H, W)`` -> ``(3, size, size)`` (bicubic, antialiased, clamped to [0, 1])."""
    return F.interpolate(
        image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )[0].clamp(0, 1)


def _stack(maps: list[LabelMap]) -> LabelMap:
    names = None if maps[0].names is None else [n for m in maps for n in m.names]  # type: ignore[union-attr]
    return LabelMap(torch.cat([m.values for m in maps]), names)


class _Runner:
    """Runs the experts over one list of images (one worker's share)."""

    def __init__(
        self,
        experts: dict[str, Expert],
        store: LabelStore,
        batch_size: int,
        log: Log,
        verify: bool = False,
        position: int = 0,
    ) -> None:
        self.experts = experts
        self.order = dependency_order(experts)
        self.needed = {r for e in experts.values() for r in e.requires}
        self.store = store
        self.batch_size = batch_size
        self.log = log
        self.verify = verify
        self.position = position
        self.report = RunReport()

    def stored(self, sha: str, name: str) -> bool:
        """The store holds whole labels of ``name`` for image ``sha`` (checksum too with
        ``verify``); a damaged file is reported and will be recomputed."""
        expert = self.experts[name]
        path = self.store.path_for(sha, expert)
        if not path.is_file():
            return False
        problem = self.store.verify_key(sha, expert) if self.verify else None
        if problem is None and not self.store.has_key(sha, expert):
            problem = "truncated (smaller than its header declares)"
        if problem is None:
            return True
        self.report.repaired.append(f"{path}: {problem}")
        return False

    def fail(self, item_path: Path, expert: str | None, message: str) -> None:
        self.report.failures.append(Failure(str(item_path), expert, message))

    def run(self, paths: Sequence[Path]) -> RunReport:
        from prismkit.core.processor import load_image

        buckets: dict[tuple[int, ...], list[_Item]] = {}
        t_last = time.monotonic()
        bar = Progress(
            len(paths),
            f"labels {self.position}" if self.position else "labels",
            unit="image",
            position=self.position,
            every_s=float("inf"),  # off a terminal: the log lines below instead
        )
        for n, path in enumerate(paths, start=1):
            self.report.images += 1
            bar.update(1)
            try:
                sha = self.store.image_key(path)
            except OSError as e:
                self.fail(path, None, f"image {path}: cannot be read ({e})")
                continue
            todo = [k for k in self.order if not self.stored(sha, k)]
            self.report.skipped += len(self.order) - len(todo)
            if not todo:
                continue
            try:
                image = load_image(path)
                if self.store.size is not None:
                    image = resize_square(image, self.store.size)
            except Exception as e:
                msg = str(e) if str(path) in str(e) else f"image {path}: {e}"
                self.fail(path, None, f"{msg}; no labels computed for it")
                continue
            bucket = buckets.setdefault(tuple(image.shape), [])
            bucket.append(_Item(path, sha, image, todo=set(todo)))
            if len(bucket) == self.batch_size:
                self.process(buckets.pop(tuple(image.shape)))
            if not bar.on_terminal and time.monotonic() - t_last > 10:
                t_last = time.monotonic()
                self.log(f"{n}/{len(paths)} images, {self.report.computed} label files written")
        for bucket in buckets.values():
            self.process(bucket)
        bar.close()
        return self.report

    def stored_input(self, item: _Item, name: str) -> LabelMap | None:
        """Labels of expert ``name`` for ``item`` as stored (from this run or an earlier one)."""
        if name not in item.labels and name not in item.failed and name not in item.todo:
            e = self.experts[name]
            if self.store.has_key(item.sha, e):
                try:
                    item.labels[name] = self.store.get_key(item.sha, e)
                except ValueError as err:  # damaged since listed: fail the dependents
                    item.failed.add(name)
                    self.fail(item.path, name, str(err))
        return item.labels.get(name)

    def process(self, items: list[_Item]) -> None:
        for name in self.order:
            expert = self.experts[name]
            todo = []
            for item in items:
                if name not in item.todo:
                    continue
                broken = [r for r in expert.requires if self.stored_input(item, r) is None]
                if broken:
                    item.failed.add(name)
                    self.fail(
                        item.path,
                        name,
                        f"expert {name!r} skipped for image {item.path}: it requires "
                        f"{broken}, which failed on this image",
                    )
                else:
                    todo.append(item)
            if todo:
                self.predict(expert, todo)

    def predict(self, expert: Expert, items: list[_Item]) -> None:
        """Run ``expert`` on ``items`` as one batch; on an error, image by image."""
        images = torch.stack([it.image for it in items]).to(expert.device)
        inputs = {
            r: _stack([self.stored_input(it, r) for it in items])  # type: ignore[misc]
            for r in expert.requires
        }
        inputs = {r: LabelMap(m.values.to(expert.device), m.names) for r, m in inputs.items()}
        try:
            with torch.inference_mode():
                out = expert.check_output(expert.predict(images, inputs), images)
        except Exception as e:
            if len(items) > 1:
                for item in items:
                    self.predict(expert, [item])
                return
            item = items[0]
            item.failed.add(expert.name)
            self.fail(
                item.path,
                expert.name,
                f"expert {expert.name!r} failed on image {item.path}: {type(e).__name__}: {e}",
            )
            return
        values = out.values.detach().cpu()
        for i, item in enumerate(items):
            one = LabelMap(values[i : i + 1], None if out.names is None else [out.names[i]])
            self.store.put_key(item.sha, expert, one)
            self.report.computed += 1
            if expert.name in self.needed:
                item.labels[expert.name] = roundtrip(one, expert.kind)


def worker_log(experts: dict[str, Expert], threads: int, index: int) -> Log:
    """In labelling process ``index``: its torch threads, a GPU for each expert left on the
    default CUDA device (round-robin over the visible GPUs), and its log function."""
    torch.set_num_threads(threads)
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        for e in experts.values():
            if e.device.type == "cuda" and e.device.index is None:
                e.device = torch.device("cuda", index % torch.cuda.device_count())

    def log(msg: str) -> None:
        print(f"[worker {index}] {msg}", flush=True)

    return log


def fan_out(worker: Callable[..., RunReport], items: list, num_workers: int, *args) -> RunReport:
    """``worker(items[i::num_workers], threads, i, *args)`` in ``num_workers`` spawned
    processes (the machine's threads shared between them); their reports merged."""
    threads = max(1, torch.get_num_threads() // num_workers)
    report = RunReport()
    with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(worker, items[i::num_workers], threads, i, *args)
            for i in range(num_workers)
        ]
        for f in futures:
            report = report.merge(f.result())
    return report


def _worker(
    paths: list[Path],
    threads: int,
    index: int,
    experts: dict[str, Expert],
    root: str,
    size: int | None,
    batch_size: int,
    verify: bool = False,
) -> RunReport:
    """One spawned process: label ``paths`` (its share) into the store at ``root``."""
    log = worker_log(experts, threads, index)
    return _Runner(experts, LabelStore(root, size), batch_size, log, verify, index).run(paths)


def run_experts(
    image_paths: Sequence[str | Path],
    experts: dict[str, Expert],
    store: LabelStore,
    batch_size: int = 8,
    num_workers: int = 1,
    shard: tuple[int, int] | None = None,
    log: Log = print,
    verify: bool = False,
) -> RunReport:
    """Label every image in ``image_paths`` (files or folders) with every expert into ``store``.

    Args:
        experts: name -> expert instance; every expert's ``requires`` must be among them.
            With ``num_workers > 1`` they are pickled into spawned processes: use experts
            defined at module level whose weights are not loaded yet.
        batch_size: images per expert call (images of equal size share a batch).
        num_workers: processes; worker ``i`` labels ``shard_paths[i::num_workers]``.
        shard: ``(rank, world)``: this call labels ``paths[rank::world]``; ``None`` reads
            ``RANK`` / ``WORLD_SIZE`` from the environment (torchrun, accelerate), else all.
        verify: check the checksum of every stored label file of these images (not only its
            size) and recompute the damaged ones.

    Temporary files that killed earlier runs left in the store are deleted first (see
    :func:`prismkit.core.io.remove_stale_temporaries`).

    Returns a ``RunReport``; failures do not raise (see ``report.failures``).
    """
    if batch_size < 1 or num_workers < 1:
        raise ValueError(
            f"batch_size and num_workers must be >= 1; got {batch_size}, {num_workers}"
        )
    for name, e in experts.items():
        if e.name != name:
            raise ValueError(f"experts[{name!r}] is expert {e.name!r}: key it by its name")
    dependency_order(experts)
    rank, world = shard if shard is not None else parse_shard()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: need 0 <= rank < world")
    paths = list_images(image_paths)[rank::world]
    stale = len(remove_stale_temporaries(store.root)) if store.root.is_dir() else 0
    if num_workers == 1:
        report = _Runner(experts, store, batch_size, log, verify).run(paths)
        report.stale_removed = stale
        return report
    report = fan_out(
        _worker, paths, num_workers, experts, str(store.root), store.size, batch_size, verify
    )
    report.stale_removed = stale
    return report
