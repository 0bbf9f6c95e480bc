"""Streamed training data: webdataset tar shards read as a stream, each sample once per epoch.

A reader that subclasses :class:`StreamingDataset` makes ``prismkit train`` take this path
instead of the map-style one (``engine/batching.py``). Memory does not grow with the corpus:
nothing is listed or held but the shard names, a shuffle buffer and the batches in flight.

One epoch, whatever the number of machines, processes and loader workers:

1. :meth:`StreamingDataset.epoch_shards` lists the epoch's shards: each source's shards
   ``weight`` times (a fractional part takes that share of the source's shards, drawn per
   epoch), then all of them permuted by ``(seed, epoch)``.
2. Process ``rank`` of ``world`` takes ``shards[rank::world]``; its loader worker ``w`` of ``W``
   takes every ``W``-th of those (the *slot* ``w``). Every shard has exactly one slot, so every
   sample is read by exactly one (process, worker).
3. A slot reads its shards in order through webdataset (``url_opener`` -> ``tar_file_expander``
   -> ``group_by_keys``: local paths, ``pipe:`` commands, URLs), passes the raw samples through
   webdataset's shuffle buffer seeded by ``(seed, epoch, rank, slot)``, decodes them (image at
   the training size, caption) and yields batches of ``batch_size`` (the slot's last one may be
   smaller).
4. The DataLoader takes batches from its workers round-robin (skipping exhausted ones), so a
   process's batch order is a function of the seed, the epoch and the shard list.
5. A process whose slots are exhausted before the others' feeds its last batch again with loss
   weight 0 (its gradient is zero; the others' losses are scaled by ``world / active`` so the
   averaged gradient is their mean) until every process is done: then the epoch ends on every
   process at the same micro-batch and the next one starts. No sample is dropped or repeated.

Resume (``--resume``) continues with the same sample order: the state holds, per process, the
epoch, how many samples of each slot were consumed and which slot is next. A resumed slot
replays its epoch's raw stream (read, shuffled, not decoded) up to that count, so the shuffle
buffer is rebuilt exactly; the cost is reading that part of the slot's shards again. Resumed
with another number of processes, workers or batch size, the epoch in progress ends in *remap*
mode: old slot ``i`` (of ``old world x old workers``) is replayed past its count and finished
by new slot ``i mod (world x workers)``, so each remaining sample is read exactly once (not in
the interrupted run's order); the next epoch uses the new layout.

Bad data (policy ``on_error``): ``"skip"`` (the default) skips a sample whose image cannot be
decoded or whose caption is missing or empty, and the rest of a shard that is truncated or cannot
be opened, naming shard and key, and counts them (log lines, ``result.json``); ``"raise"`` stops
every process at the same step with that message, after saving the resumable state of the steps
already done.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prismkit.core.data import DataError, Sample
from prismkit.core.shards import read_shard

ON_ERROR = ("skip", "raise")
# problem messages kept (and saved in the run state); beyond it only counted
MAX_PROBLEMS_KEPT = 1000


@dataclass(frozen=True)
class Source:
    """One corpus of shards (CC3M, COCO, ...): ``weight`` times each of its samples per epoch
    (a fraction takes that share of its shards, drawn per epoch)."""

    name: str
    shards: tuple[str, ...]
    weight: float = 1.0


class StreamingDataset(ABC):
    """Base of streaming readers. A subclass sets ``name`` and ``task`` and implements
    :meth:`decode`; the constructor takes the sources and the policies.

    Args:
        sources: the corpora (at least one shard each).
        shuffle_buffer: samples held by each loader worker's shuffle buffer (webdataset's
            ``shuffle``); 0 or 1 = read order.
        shuffle_shards: permute the epoch's shard list by ``(seed, epoch)``.
        on_error: ``"skip"`` bad samples and damaged shards (named and counted) or ``"raise"``.
        seed: base of every draw (shard order, fractional weights, shuffle buffers).
    """

    name: ClassVar[str]
    task: ClassVar[str]
    answer_list: list[str] | None = None

    def __init__(
        self,
        sources: list[Source],
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        on_error: str = "skip",
        seed: int = 0,
    ) -> None:
        if not sources:
            raise DataError(f"dataset {self.name!r}: no sources")
        for s in sources:
            if not s.shards:
                raise DataError(f"dataset {self.name!r}: source {s.name!r} has no shards")
            if not s.weight > 0:
                raise DataError(
                    f"dataset {self.name!r}: source {s.name!r} weight must be positive, got "
                    f"{s.weight}"
                )
        if len({s.name for s in sources}) != len(sources):
            raise DataError(
                f"dataset {self.name!r}: source names repeat: {[s.name for s in sources]}"
            )
        if on_error not in ON_ERROR:
            raise DataError(
                f"dataset {self.name!r}: on_error must be one of {ON_ERROR}, got {on_error!r}"
            )
        if shuffle_buffer < 0:
            raise DataError(f"dataset {self.name!r}: shuffle_buffer must be 0 or more")
        self.sources = list(sources)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = bool(shuffle_shards)
        self.on_error = on_error
        self.seed = int(seed)

    @abstractmethod
    def decode(self, raw: dict[str, Any]) -> Sample:
        """One raw webdataset sample (``__key__``, ``__url__``, extension -> bytes) -> a
        ``Sample`` whose ``image`` is a decoded ``(3, H, W)`` tensor in [0, 1]. A bad sample
        raises ``DataError`` naming shard and key."""

    def epoch_shards(self, epoch: int) -> list[tuple[int, str]]:
        """``(source index, url)`` of every shard read in ``epoch``, in reading order."""
        plan: list[tuple[int, str]] = []
        for i, s in enumerate(self.sources):
            whole = int(s.weight)
            plan += [(i, u) for _ in range(whole) for u in s.shards]
            part = round((s.weight - whole) * len(s.shards))
            if part:
                rng = np.random.default_rng([self.seed, epoch, i, 1])
                plan += [(i, s.shards[j]) for j in sorted(rng.permutation(len(s.shards))[:part])]
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(plan))
            plan = [plan[j] for j in order]
        return plan

    def __repr__(self) -> str:
        shown = ", ".join(f"{s.name}: {len(s.shards)} shards x {s.weight:g}" for s in self.sources)
        return f"{type(self).__name__}({shown})"


# -- reading, in the loader workers -------------------------------------------------------------
def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(3, H, W)`` -> ``(3, size, size)`` as the map-style path's image cache does (bicubic,
    antialiased, clamped to [0, 1])."""
    return F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True)[0].clamp(
        0, 1
    )


@dataclass
class StreamBatch:
    """What a loader worker hands the training process: one micro-batch, or only news."""

    # the slot (worker share) it comes from, and that slot's samples emitted after it
    slot: int
    pos: int
    samples: list[Sample] = field(default_factory=list)
    # (B, 3, S, S) images at the training size
    pixels: torch.Tensor | None = None
    # streamed expert labels: expert name -> LabelMap of the batch (None: no label store)
    labels: dict[str, Any] | None = None
    # bad samples / shards met since the slot's previous batch (messages)
    problems: list[str] = field(default_factory=list)
    # source index of each sample
    sources: list[int] = field(default_factory=list)
    # policy "raise": the message that stops the run
    error: str | None = None


class _SlotStream(IterableDataset):
    """The torch dataset the DataLoader runs: each worker reads its slot (see module doc)."""

    def __init__(
        self,
        data: StreamingDataset,
        epoch: int,
        rank: int,
        world: int,
        workers: int,
        batch_size: int,
        image_size: int,
        skip: dict[int, int],
        offset: int,
        labels: Any = None,
        remap: dict[str, Any] | None = None,
    ) -> None:
        self.data, self.epoch, self.rank, self.world = data, epoch, rank, world
        self.workers, self.batch_size, self.image_size = max(1, workers), batch_size, image_size
        self.skip, self.offset, self.labels, self.remap = skip, offset, labels, remap

    def slot_shards(
        self,
        slot: int,
        rank: int | None = None,
        world: int | None = None,
        workers: int | None = None,
    ) -> list[tuple[int, str]]:
        """The epoch's shards of ``slot`` of process ``rank`` (default: this layout's)."""
        rank = self.rank if rank is None else rank
        world = self.world if world is None else world
        workers = self.workers if workers is None else workers
        return self.data.epoch_shards(self.epoch)[rank::world][slot::workers]

    def raw_slot(
        self, slot: int, report: list[Callable[[str], None]], rank: int, world: int, workers: int
    ) -> Iterator[dict[str, Any]]:
        """The raw samples of one slot in reading order: its shards through the shuffle buffer
        seeded by ``(seed, epoch, rank, slot)``. Problems go to ``report[0]`` (switchable)."""

        def chained() -> Iterator[dict[str, Any]]:
            for src, url in self.slot_shards(slot, rank, world, workers):
                for raw in read_shard(url, lambda m: report[0](m)):
                    raw["__source__"] = src
                    yield raw

        stream: Iterator[dict[str, Any]] = chained()
        if self.data.shuffle_buffer > 1:
            from webdataset.filters import _shuffle

            rng = np.random.default_rng([self.data.seed, self.epoch, rank, slot, 2])
            stream = _shuffle(
                stream,
                bufsize=self.data.shuffle_buffer,
                initial=self.data.shuffle_buffer,
                seed=int(rng.integers(2**62)),
            )
        return stream

    def remapped(self, slot: int, problems: list[str]) -> Iterator[dict[str, Any]]:
        """Resumed with another layout mid-epoch: this slot reads what remains of the old slots
        ``i`` with ``i % (world x workers) == its global index`` (each old slot replayed past
        what it had consumed), so every remaining sample of the epoch is read exactly once."""
        assert self.remap is not None
        old_world, old_workers = self.remap["world"], self.remap["workers"]
        mine = self.rank * self.workers + slot
        for i, (r, s) in enumerate((r, s) for r in range(old_world) for s in range(old_workers)):
            if i % (self.world * self.workers) != mine:
                continue
            report: list[Callable[[str], None]] = [lambda m: None]  # replayed part: reported
            stream = self.raw_slot(s, report, r, old_world, old_workers)
            for _ in range(int(self.remap["consumed"].get(f"{r}/{s}", 0))):
                if next(stream, None) is None:
                    break
            report[0] = problems.append
            yield from stream

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (worker + self.offset) % self.workers
        if info is not None:
            torch.set_num_threads(1)
        yield from self.read_slot(slot)

    def read_slot(self, slot: int) -> Iterator[StreamBatch]:
        problems: list[str] = []
        report: list[Callable[[str], None]] = [lambda m: None]  # the replayed part: reported
        if self.remap is None:
            stream = self.raw_slot(slot, report, self.rank, self.world, self.workers)
        else:
            stream = self.remapped(slot, problems)
        pos = 0
        for _ in range(self.skip.get(slot, 0)):  # resume: replay without decoding
            if next(stream, None) is None:
                break
            pos += 1
        report[0] = problems.append
        problems.clear()  # reported before the interruption
        batch: list[Sample] = []
        pixels: list[torch.Tensor] = []
        sources: list[int] = []
        raws: list[dict[str, Any]] = []
        for raw in stream:
            if problems and self.data.on_error == "raise":  # a damaged shard
                yield StreamBatch(slot, pos, error=problems[0])
                return
            pos += 1
            try:
                sample = self.data.decode(raw)
                image = resize_image(sample.image, self.image_size)  # type: ignore[arg-type]
            except DataError as e:
                if self.data.on_error == "raise":
                    yield StreamBatch(slot, pos - 1, problems=_take(problems), error=str(e))
                    return
                problems.append(str(e))
                if len(batch) == 0 and len(problems) >= self.batch_size:
                    yield StreamBatch(slot, pos, problems=_take(problems))
                continue
            sample.image = sample.image_id  # the decoded image travels in ``pixels`` only
            batch.append(sample)
            pixels.append(image)
            sources.append(raw["__source__"])
            raws.append(raw)
            if len(batch) == self.batch_size:
                yield self._emit(slot, pos, batch, pixels, sources, raws, _take(problems))
                batch, pixels, sources, raws = [], [], [], []
        if problems and self.data.on_error == "raise":
            yield StreamBatch(slot, pos, error=problems[0])
            return
        if batch or problems:
            yield self._emit(slot, pos, batch, pixels, sources, raws, _take(problems))

    def _emit(self, slot, pos, batch, pixels, sources, raws, problems) -> StreamBatch:
        if not batch:
            return StreamBatch(slot, pos, problems=problems)
        labels = None
        if self.labels is not None:
            try:
                labels = self.labels.batch(raws, self.image_size)
            except DataError as e:  # labels missing from the store: never trained without
                return StreamBatch(slot, pos, problems=problems, error=str(e))
        return StreamBatch(slot, pos, batch, torch.stack(pixels), labels, problems, sources)


# -- the training process's side ----------------------------------------------------------------
@dataclass
class Fed:
    """One micro-batch for the loop: samples, images, labels, and the loss scale (0 for a
    process whose epoch is done while others' is not)."""

    samples: list[Sample]
    pixels: torch.Tensor
    labels: dict[str, Any] | None
    scale: float
    keys: list[str]


class StreamFeed:
    """Micro-batches of a :class:`StreamingDataset` for one training process: epochs, the
    exactly-once bookkeeping, the resumable position, counts of sources and bad samples.

    ``reduce_sum(tensor)`` sums a small tensor over processes (identity for one process); every
    process calls :meth:`next` the same number of times (the loop's micro-batches)."""

    def __init__(
        self,
        data: StreamingDataset,
        *,
        rank: int,
        world: int,
        workers: int,
        batch_size: int,
        image_size: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        labels: Any = None,
        key_log: Path | None = None,
    ) -> None:
        self.data, self.rank, self.world = data, rank, world
        self.workers, self.batch_size, self.image_size = workers, batch_size, image_size
        self.reduce_sum, self.labels = reduce_sum, labels
        self.epoch = 0
        self.consumed: dict[int, int] = {}  # slot -> samples consumed this epoch
        self.next_slot = 0
        # resumed with another layout: the old layout's positions in the epoch in progress
        self.remap: dict[str, Any] | None = None
        self.source_counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.problem_count = 0
        self.key_log = key_log
        self._iter: Iterator[StreamBatch] | None = None
        self._last: Fed | None = None
        self._done = False
        self._fed_this_epoch = False

    # position ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This process's position (JSON): restore it with :meth:`restore`."""
        return {
            "rank": self.rank,
            "world": self.world,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "consumed": {str(k): v for k, v in sorted(self.consumed.items())},
            "next_slot": self.next_slot,
            "remap": self.remap,
            "sources": dict(self.source_counts),
            "problems": list(self.problems),
            "problem_count": self.problem_count,
        }

    def restore(self, states: list[dict[str, Any]], step: int | None = None) -> None:
        """Continue where the saved run stopped (``states``: every process's :meth:`state`).

        With the same processes, workers and batch size the sample order is the uninterrupted
        run's. With another layout the epoch in progress finishes in *remap* mode: each old
        slot's remainder is read by one new slot (:meth:`_SlotStream.remapped`), so every
        remaining sample is read exactly once, in another order; later epochs use the new
        layout."""
        mine = next((s for s in states if s["rank"] == self.rank), None)
        layout = (self.world, self.workers, self.batch_size)
        if mine is not None and (mine["world"], mine["workers"], mine["batch_size"]) == layout:
            self.epoch = int(mine["epoch"])
            self.consumed = {int(k): int(v) for k, v in mine["consumed"].items()}
            self.next_slot = int(mine["next_slot"])
            self.remap = mine.get("remap")
            self.source_counts = Counter(mine.get("sources", {}))
            self.problems = list(mine.get("problems", []))
            self.problem_count = int(mine.get("problem_count", 0))
        else:
            was = states[0]
            if any(st.get("remap") for st in states):
                raise ValueError(
                    f"--resume: the saved run was itself resumed with another layout in epoch "
                    f"{was['epoch']}; resume it with its layout ({was['world']} process(es) x "
                    f"{was['workers']} worker(s), batch {was['batch_size']}) until that epoch ends"
                )
            self.epoch = int(was["epoch"])
            self.consumed, self.next_slot = {}, 0
            self.remap = {
                "world": int(was["world"]),
                "workers": max(1, int(was["workers"])),
                "consumed": {
                    f"{st['rank']}/{k}": int(v) for st in states for k, v in st["consumed"].items()
                },
            }
            self.source_counts, self.problems, self.problem_count = Counter(), [], 0
            if self.rank == 0:  # the totals are summed over processes: keep them once
                for st in states:
                    self.source_counts.update(st.get("sources", {}))
                    self.problems += st.get("problems", [])
                    self.problem_count += int(st.get("problem_count", 0))
                self.problems = self.problems[:MAX_PROBLEMS_KEPT]
        self._iter, self._done = None, False
        self._fed_this_epoch = True
        if self.key_log is not None and step is not None:
            logs = [self.key_log]
            if self.rank == 0:  # and those of processes the new layout does not have
                logs += [self.key_log.with_name(f"rank{st['rank']}.jsonl") for st in states]
                logs = [p for p in logs if p == self.key_log or int(p.stem[4:]) >= self.world]
            for path in dict.fromkeys(logs):
                if path.exists():
                    kept = [
                        line
                        for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] < step
                    ]
                    path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        """Stop the loader workers now (a run that ends mid-epoch leaves them reading ahead,
        and a process whose iterator is not collected would wait for them at exit)."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-worker iterator
        if shutdown is not None:
            shutdown()

    # reading ----------------------------------------------------------------------------------
    def _loader(self) -> Iterator[StreamBatch]:
        ds = _SlotStream(
            self.data,
            self.epoch,
            self.rank,
            self.world,
            self.workers,
            self.batch_size,
            self.image_size,
            dict(self.consumed),
            self.next_slot,
            self.labels,
            self.remap,
        )
        if self.workers == 0:
            return iter(ds)
        return iter(
            DataLoader(
                ds,
                batch_size=None,
                num_workers=self.workers,
                collate_fn=_identity,
                prefetch_factor=2,
                worker_init_fn=_ignore_stop_signals,
            )
        )

    def _own_next(self) -> tuple[Fed | None, str | None]:
        """This process's next micro-batch of the epoch (``None`` when its slots are done)."""
        if self._done:
            return None, None
        if self._iter is None:
            self._iter = self._loader()
        while True:
            got = next(self._iter, None)
            if got is None:
                self._done, self._iter = True, None
                return None, None
            self.consumed[got.slot] = got.pos
            self.next_slot = (got.slot + 1) % max(1, self.workers)
            for p in got.problems:
                self.problem_count += 1
                if len(self.problems) < MAX_PROBLEMS_KEPT:
                    self.problems.append(p)
            if got.error is not None:
                return None, got.error
            if got.samples:
                for s in got.sources:
                    self.source_counts[self.data.sources[s].name] += 1
                keys = [s.image_id for s in got.samples]
                return Fed(got.samples, got.pixels, got.labels, 1.0, keys), None  # type: ignore[arg-type]

    def next(self, step: int, micro: int = 0) -> Fed:
        """The next micro-batch on every process, in lockstep (a collective call)."""
        while True:
            fed, error = self._own_next()
            flags = self.reduce_sum(
                torch.tensor([float(fed is not None), float(error is not None)])
            )
            active, errors = int(flags[0].item()), int(flags[1].item())
            if errors:
                raise DataError(
                    error
                    or "another process stopped on bad data (on_error='raise'; see its message)"
                )
            if active == 0:  # every process is through the epoch: the next one starts
                if not self._fed_this_epoch:
                    shown = "; ".join(self.problems[-3:]) or "the shards hold no sample"
                    raise DataError(
                        f"epoch {self.epoch} of {self.data!r} gave no sample to any process "
                        f"(process {self.rank}: {shown})"
                    )
                self.epoch += 1
                self.consumed, self.next_slot, self._done, self._iter = {}, 0, False, None
                self.remap = None
                self._fed_this_epoch = False
                continue
            self._fed_this_epoch = True
            if fed is None:
                if self._last is None:
                    raise DataError(
                        f"process {self.rank} has no sample in epoch {self.epoch} (its shards are "
                        f"empty or bad): give at least as many good shards as processes"
                    )
                return Fed(self._last.samples, self._last.pixels, self._last.labels, 0.0, [])
            fed.scale = self.world / active
            self._last = fed
            if self.key_log is not None:
                self.key_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.key_log, "a", encoding="utf-8") as f:
                    f.write(
                        json.dumps(
                            {"step": step, "micro": micro, "epoch": self.epoch, "keys": fed.keys}
                        )
                        + "\n"
                    )
            return fed

    def counts(self) -> dict[str, int]:
        """Samples consumed per source (this process)."""
        return {s.name: int(self.source_counts.get(s.name, 0)) for s in self.data.sources}


def _take(items: list[str]) -> list[str]:
    """A copy of ``items``, which is emptied (the shard reader keeps appending to it)."""
    out = list(items)
    items.clear()
    return out


def _ignore_stop_signals(worker: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the training process, which finishes its step,
    saves and stops them (a terminal's Ctrl-C reaches the whole process group)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _identity(x: Any) -> Any:
    return x
