"""Precompute expert labels of webdataset shards into a :class:`ShardLabelStore`: one file per
(shard, expert), sharded across machines and processes, resumable shard by shard.

``run_experts_on_shards`` expands the shard patterns, takes this machine's share
(``shards[rank::world]``, ``RANK`` / ``WORLD_SIZE`` from torchrun or accelerate), splits it again
across ``num_workers`` spawned processes and, in each, reads shard after shard:

- a shard whose file the store holds (whole) for every expert is not even opened: an
  interrupted run continues with the first shard it had not finished;
- otherwise every sample's image is decoded (resized to ``S x S`` first with ``--size S``) and
  the experts run as ``prismkit experts run`` runs them on image files (batches of equal size,
  dependency order, a dependent reads its requirements' stored labels, a failing image fails
  alone, named by shard and key); the labels of experts already stored for the shard are read,
  not recomputed, when a dependent needs them;
- each expert's labels of the shard are written at once (temporary file + rename).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prismkit.core.data import DataError
from prismkit.core.expert import Expert, LabelMap
from prismkit.core.io import remove_stale_temporaries
from prismkit.core.shards import expand_shards, image_of, read_shard
from prismkit.labels.runner import (
    Failure,
    Log,
    RunReport,
    _Item,
    _Runner,
    dependency_order,
    fan_out,
    parse_shard,
    resize_square,
    worker_log,
)
from prismkit.labels.shard_store import ShardLabelStore


class _MemoryStore:
    """One shard's labels while they are computed (what ``_Runner`` reads and writes), kept
    encoded as the file will hold them (dense float16, semantic uint16): a shard's labels take
    what its file will take."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.maps: dict[tuple[str, str], tuple[dict, list[str] | None]] = {}

    def path_for(self, key: str, expert: type[Expert] | Expert) -> Path:
        return Path(f"<shard>/{expert.name}/{key}")

    def has_key(self, key: str, expert: type[Expert] | Expert) -> bool:
        return (key, expert.name) in self.maps

    def get_key(self, key: str, expert: type[Expert] | Expert) -> LabelMap:
        from prismkit.labels.store import decode_labels

        return decode_labels(*self.maps[(key, expert.name)])

    def put(self, key: str, expert: type[Expert] | Expert, labels: LabelMap) -> None:
        """Labels read from an earlier file (decoded), kept encoded."""
        from prismkit.labels.store import encode_labels

        self.maps[(key, expert.name)] = encode_labels(labels, expert.kind)

    def put_key(self, key: str, expert: type[Expert] | Expert, labels: LabelMap) -> Path:
        self.put(key, expert, labels)
        return self.path_for(key, expert)


class _ShardRunner(_Runner):
    def stored(self, sha: str, name: str) -> bool:
        return self.store.has_key(sha, self.experts[name])

    def run_shard(self, url: str, store: ShardLabelStore) -> None:
        """Label one shard with the experts whose file for it is missing; write their files."""
        todo = [n for n in self.order if not store.has(url, self.experts[n])]
        self.report.skipped += len(self.order) - len(todo)
        if not todo:
            return
        files_before = self.report.computed
        mem = _MemoryStore(store.size)
        self.store = mem  # type: ignore[assignment]
        done = [n for n in self.order if n not in todo]
        files = {n: store.open(url, self.experts[n]) for n in done if n in self.needed}
        buckets: dict[tuple[int, ...], list[_Item]] = {}
        keys: list[str] = []

        def problem(message: str) -> None:
            self.report.failures.append(Failure(url, None, message))

        for raw in read_shard(url, problem):
            key = raw["__key__"]
            where = f"shard {url}: sample {key}"
            self.report.images += 1
            try:
                image = image_of(raw, where)
                if store.size is not None:
                    image = resize_square(image, store.size)
            except DataError as e:
                problem(f"{e}; no labels computed for it")
                continue
            keys.append(key)
            for n, f in files.items():  # requirements stored earlier: read, not recomputed
                try:
                    mem.put(key, self.experts[n], f.get(key))
                except DataError as e:
                    problem(str(e))
            item = _Item(Path(f"{url}#{key}"), key, image, todo=set(todo))
            bucket = buckets.setdefault(tuple(image.shape), [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                self.process(buckets.pop(tuple(image.shape)))
        for bucket in buckets.values():
            self.process(bucket)
        for n in todo:
            e = self.experts[n]
            store.write_encoded(url, e, {k: mem.maps[(k, n)] for k in keys if (k, n) in mem.maps})
        self.report.computed = files_before + len(todo)  # files, not (image, expert) pairs


def _shard_worker(
    shards: list[str],
    threads: int,
    index: int,
    experts: dict[str, Expert],
    root: str,
    size: int | None,
    batch_size: int,
) -> RunReport:
    log = worker_log(experts, threads, index)
    return _label_shards(shards, experts, ShardLabelStore(root, size), batch_size, log, index)


def _label_shards(
    shards: Sequence[str],
    experts: dict[str, Expert],
    store: ShardLabelStore,
    batch_size: int,
    log: Log,
    position: int = 0,
) -> RunReport:
    runner = _ShardRunner(experts, store, batch_size, log, False, position)  # type: ignore[arg-type]
    for n, url in enumerate(shards, start=1):
        runner.run_shard(url, store)
        log(f"shard {n}/{len(shards)} {url}: {runner.report.computed} label files written so far")
    return runner.report


def run_experts_on_shards(
    shards: Sequence[str],
    experts: dict[str, Expert],
    store: ShardLabelStore,
    batch_size: int = 8,
    num_workers: int = 1,
    shard: tuple[int, int] | None = None,
    log: Log = print,
) -> RunReport:
    """Label every sample of the webdataset ``shards`` (paths, brace patterns, ``pipe:``
    commands) with every expert into ``store``: one file per (shard, expert).

    ``shard=(rank, world)`` labels ``shards[rank::world]`` (``None``: ``RANK`` / ``WORLD_SIZE``
    from the environment, else all); ``num_workers`` processes split that again. The report
    counts images (samples read), label files written (``computed``) and (shard, expert) files
    already stored (``skipped``); failures name shard and key and do not raise."""
    if batch_size < 1 or num_workers < 1:
        raise ValueError(
            f"batch_size and num_workers must be >= 1; got {batch_size}, {num_workers}"
        )
    dependency_order(experts)
    rank, world = shard if shard is not None else parse_shard()
    urls = [u for s in shards for u in expand_shards(s)][rank::world]
    stale = len(remove_stale_temporaries(store.root)) if store.root.is_dir() else 0
    if num_workers == 1:
        report = _label_shards(urls, experts, store, batch_size, log)
        report.stale_removed = stale
        return report
    report = fan_out(
        _shard_worker, urls, num_workers, experts, str(store.root), store.size, batch_size
    )
    report.stale_removed = stale
    return report
