"""Streamed training data (engine/stream.py, datasets/stream.py): each sample exactly once per
epoch across processes x loader workers, exact resume, weighted sources, bad shards named and
counted, the training loop on a stream (one process and torchrun x 2 with 2 workers each)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import tiny_cli_sets, tiny_config
from stream_helpers import png_bytes, write_shards

from prismkit.core.data import DataError
from prismkit.core.shards import expand_shards
from prismkit.datasets.stream import WebDatasetStream
from prismkit.engine.stream import StreamFeed, _SlotStream
from prismkit.engine.train import RunConfig, train


def _slot_keys(data, epoch, rank, world, workers, batch=4) -> list[str]:
    ds = _SlotStream(data, epoch, rank, world, workers, batch, 8, {}, 0)
    keys = []
    for slot in range(max(1, workers)):
        for b in ds.read_slot(slot):
            keys += [s.image_id for s in b.samples]
    return keys


def _feed(data, workers=2, batch=4):
    return StreamFeed(
        data,
        rank=0,
        world=1,
        workers=workers,
        batch_size=batch,
        image_size=8,
        reduce_sum=lambda t: t,
    )


def test_brace_patterns_and_lists(tmp_path):
    assert expand_shards("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_shards("a/{0..1}.tar::b/{7..8}.tar") == [
        "a/0.tar",
        "a/1.tar",
        "b/7.tar",
        "b/8.tar",
    ]
    assert expand_shards(["pipe:cat x.tar", "y.tar"]) == ["pipe:cat x.tar", "y.tar"]
    with pytest.raises(DataError, match="string pattern or a list"):
        expand_shards(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_sample_once_per_epoch_whatever_the_slots(tmp_path_factory, world, workers):
    """The union over processes and workers of what each reads is the corpus, each key once, in
    every epoch (shard order and shuffle buffers differ per epoch)."""
    root = tmp_path_factory.getbasetemp() / "once"
    if not root.exists():
        write_shards(root, 7, 9)
    keys = sorted(f"s{s:03d}_{i:04d}" for s in range(7) for i in range(9))
    data = WebDatasetStream(shards=str(root / "s-{000000..000006}.tar"), shuffle_buffer=5)
    orders = []
    for epoch in (0, 1):
        got = [k for r in range(world) for k in _slot_keys(data, epoch, r, world, workers)]
        assert sorted(got) == keys, Counter(got).most_common(3)
        orders.append(got)
    assert orders[0] != orders[1]


def test_pipe_urls_and_json_captions(tmp_path):
    keys = write_shards(tmp_path, 2, 5, prefix="j", caption_format="json")
    data = WebDatasetStream(shards=[f"pipe:cat {tmp_path}/j-00000{i}.tar" for i in range(2)])
    feed = _feed(data, workers=0)
    seen = []
    while feed.epoch == 0:
        fed = feed.next(0)
        if feed.epoch == 0:
            seen += fed.keys
            assert fed.samples[0].target and fed.pixels.shape[1:] == (3, 8, 8)
    assert sorted(seen) == sorted(keys)


def test_resume_continues_the_same_order(tmp_path):
    """Stopped after k micro-batches (inside an epoch, at its end, in the next one), a new feed
    restored from the saved position yields exactly what the uninterrupted one did."""
    write_shards(tmp_path, 5, 11)
    data = WebDatasetStream(shards=str(tmp_path / "s-{000000..000004}.tar"), shuffle_buffer=7)
    full = _feed(data)
    want = [full.next(i).keys for i in range(24)]
    for k in (1, 6, 13, 15, 20):
        a = _feed(data)
        head = [a.next(i).keys for i in range(k)]
        state = json.loads(json.dumps(a.state()))  # through JSON, as saved
        b = _feed(data)
        b.restore([state])
        assert head + [b.next(i).keys for i in range(k, 24)] == want, k


def _rest_of_epoch(feed) -> list[str]:
    seen = []
    while True:
        fed = feed.next(0)
        if feed.epoch > 0:
            return seen
        seen += fed.keys


def test_resume_with_another_layout_reads_each_remaining_sample_once(tmp_path):
    """Resumed mid-epoch with other process / worker counts or batch size, the epoch in
    progress ends in remap mode (each old slot's remainder read by one new slot): consumed +
    remaining = every key once; the next epoch uses the new layout."""
    keys = write_shards(tmp_path, 6, 9)
    data = WebDatasetStream(shards=str(tmp_path / "s-{000000..000005}.tar"), shuffle_buffer=5)
    # a 2-process x 2-worker run that consumed some samples of each slot (saved states)
    consumed, states = [], []
    for rank in (0, 1):
        ds = _SlotStream(data, 0, rank, 2, 2, 4, 8, {}, 0)
        taken = {}
        for slot, c in ((0, 7), (1, 3)):
            got = [k for b in ds.read_slot(slot) for k in (s.image_id for s in b.samples)]
            consumed += got[:c]
            taken[str(slot)] = c
        states.append(
            {"rank": rank, "world": 2, "workers": 2, "batch_size": 4, "epoch": 0,
             "consumed": taken, "next_slot": 0, "sources": {"shards": 10}, "problem_count": 0}
        )  # fmt: skip
    # one process, three workers, batch 3
    feed = _feed(data, workers=3, batch=3)
    feed.restore(json.loads(json.dumps(states)))
    assert feed.remap is not None and feed.counts() == {"shards": 20}
    rest = _rest_of_epoch(feed)
    assert sorted(consumed + rest) == sorted(keys)
    assert feed.remap is None  # epoch 1: the new layout
    # three processes x two workers (read slot by slot)
    remap = {"world": 2, "workers": 2, "consumed": {f"{st['rank']}/{k}": v for st in states for k, v in st["consumed"].items()}}  # fmt: skip
    rest = [
        s.image_id
        for r in range(3)
        for slot in range(2)
        for b in _SlotStream(data, 0, r, 3, 2, 4, 8, {}, 0, remap=remap).read_slot(slot)
        for s in b.samples
    ]
    assert sorted(consumed + rest) == sorted(keys)
    # resumed again in the new layout before the remapped epoch ends: still exact
    a = _feed(data, workers=3, batch=3)
    a.restore(states)
    head = [a.next(0).keys for _ in range(4)]
    b = _feed(data, workers=3, batch=3)
    b.restore([json.loads(json.dumps(a.state()))])
    assert sorted(consumed + [k for h in head for k in h] + _rest_of_epoch(b)) == sorted(keys)
    c = _feed(data, workers=1, batch=3)
    with pytest.raises(ValueError, match="itself resumed with another layout"):
        c.restore([a.state()])


def test_weighted_sources_and_counts(tmp_path):
    """Weight 2 reads a source's samples twice per epoch, 0.5 half its shards (drawn per epoch);
    the per-source counts say so."""
    a = write_shards(tmp_path / "a", 2, 4, prefix="a")
    b = write_shards(tmp_path / "b", 4, 3, prefix="b")
    data = WebDatasetStream(
        sources=[
            {"name": "cc3m", "shards": str(tmp_path / "a" / "a-{000000..000001}.tar"), "weight": 2},
            {
                "name": "coco",
                "shards": str(tmp_path / "b" / "b-{000000..000003}.tar"),
                "weight": 0.5,
            },
        ],
        shuffle_buffer=4,
    )
    feed = _feed(data, batch=3)
    seen = []
    while feed.epoch == 0:
        fed = feed.next(0)
        if feed.epoch == 0:
            seen += fed.keys
            counts = feed.counts()
    c = Counter(seen)
    assert all(c[k] == 2 for k in a)
    assert sum(c[k] for k in b) == 6 and all(c[k] in (0, 1) for k in b)
    assert counts == {"cc3m": 16, "coco": 6}
    with pytest.raises(DataError, match="weight must be positive"):
        WebDatasetStream(sources=[{"name": "x", "shards": "x.tar", "weight": 0}])
    with pytest.raises(DataError, match="one of the options"):
        WebDatasetStream()


def _bad_corpus(tmp_path: Path) -> list[str]:
    """Three good shards; one truncated mid-sample; one with a sample missing its caption and
    one whose image is not an image."""
    write_shards(tmp_path, 3, 4)
    write_shards(tmp_path, 1, 4, prefix="c")
    good = tmp_path / "c-000000.tar"
    cut = tmp_path / "cut.tar"
    with tarfile.open(good) as t:
        third = [m for m in t.getmembers() if m.name.startswith("c000_0002")][0]
    cut.write_bytes(good.read_bytes()[: third.offset_data + 20])  # ends inside sample 3
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        w.write({"__key__": "nocap", "png": png_bytes(1)})
        w.write({"__key__": "notimage", "png": b"not a png at all", "txt": "red circle"})
        w.write({"__key__": "fine", "png": png_bytes(2), "txt": "blue square"})
    return [str(tmp_path / f"s-00000{i}.tar") for i in range(3)] + [
        str(cut),
        str(tmp_path / "bad.tar"),
    ]


def test_bad_shards_are_named_counted_and_skipped(tmp_path):
    shards = _bad_corpus(tmp_path)
    with tarfile.open(shards[3]) as t:  # noqa: SIM117 - the damage is real
        with pytest.raises(tarfile.ReadError):
            t.getmembers()
    data = WebDatasetStream(shards=shards, shuffle_buffer=0)
    feed = _feed(data, workers=2)
    seen = []
    while feed.epoch == 0:
        fed = feed.next(0)
        if feed.epoch == 0:
            seen += fed.keys
    assert len(seen) == len(set(seen)) == 12 + 2 + 1  # 3 good shards, 2 of cut, "fine"
    assert "fine" in seen and "c000_0000" in seen
    text = "\n".join(feed.problems)
    assert feed.problem_count == 3, text
    assert f"shard {shards[3]}: damaged or unreadable in sample c000_0002" in text
    assert f"shard {shards[4]}: sample nocap: no .txt or .json caption" in text
    assert f"shard {shards[4]}: sample notimage: image .png cannot be decoded" in text
    missing = WebDatasetStream(shards=[str(tmp_path / "nope.tar")], shuffle_buffer=0)
    f2 = _feed(missing, workers=0)
    with pytest.raises(DataError, match="epoch 0 of .* gave no sample to any process"):
        f2.next(0)
    assert "nope.tar: cannot be opened or read" in f2.problems[0]


def test_bad_data_raise_policy_stops_and_keeps_the_work(host, tiny_dir, tmp_path):
    """on_error="raise": the run stops with the shard and key, after saving the state and the log
    of the steps already done."""
    shards = _bad_corpus(tmp_path)
    out = tmp_path / "run"
    run = RunConfig.from_dict(
        {
            "data": {
                "dataset": "webdataset_stream",
                "options": {
                    "shards": shards,
                    "shuffle_buffer": 0,
                    "on_error": "raise",
                    "shuffle_shards": False,
                },
            },
            "train": {"steps": 50, "batch_size": 2, "eval_questions": 0, "out_dir": str(out)},
        }
    )
    with pytest.raises(
        DataError, match=r"cut.tar: damaged or unreadable in sample c000_0002.*stopped at step 6"
    ):
        train(tiny_config(tiny_dir), run, host)
    state = json.loads((out / "last" / "state.json").read_text())
    assert state["step"] == 6 and len((out / "log.jsonl").read_text().splitlines()) == 6
    assert state["stream"][0]["consumed"] == {"0": 12}  # the steps done, not the half step


def test_training_streams_one_process(host, tiny_dir, tmp_path):
    write_shards(tmp_path / "sh", 3, 6)
    out = tmp_path / "run"
    run = RunConfig.from_dict(
        {
            "data": {
                "dataset": "webdataset_stream",
                "options": {
                    "shards": str(tmp_path / "sh" / "s-{000000..000002}.tar"),
                    "shuffle_buffer": 4,
                },
                "workers": 1,
                "record_keys": True,
            },
            "train": {"steps": 6, "batch_size": 4, "eval_questions": 0, "out_dir": str(out)},
        }
    )
    result = train(tiny_config(tiny_dir), run, host)
    assert result["steps"] == 6 and result["stream"]["epoch"] == 1
    assert result["stream"]["samples_per_source"] == {"shards": 22}  # 4+4+4+4+2, then 4
    lines = [json.loads(x) for x in (out / "keys" / "rank0.jsonl").read_text().splitlines()]
    epoch0 = [k for x in lines if x["epoch"] == 0 for k in x["keys"]]
    assert len(epoch0) == len(set(epoch0)) == 18
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged[0]["samples_per_source"] == {"shards": 4} and logged[0]["bad_samples"] == 0
    assert logged[-1]["samples_per_source"] == {"shards": 22} and logged[-1]["epoch"] == 1
    bad = RunConfig.from_dict(
        {
            **json.loads(
                json.dumps(
                    {"data": {"dataset": "webdataset_stream", "options": {"shards": "x.tar"}}}
                )
            ),
            "train": {"epochs": 1},
        }
    )
    with pytest.raises(Exception, match="set train.steps"):
        train(tiny_config(tiny_dir), bad, host)


def test_streamed_training_evaluates_on_a_map_style_set(host, tiny_dir, tmp_path):
    """data.eval_dataset with its own data.eval_options: a stream trains, easy-vqa evaluates."""
    write_shards(tmp_path / "sh", 2, 4)
    run = RunConfig.from_dict(
        {
            "data": {
                "dataset": "webdataset_stream",
                "options": {"shards": str(tmp_path / "sh" / "s-{000000..000001}.tar")},
                "eval_dataset": "easyvqa_captions",
                "eval_options": {},
            },
            "train": {
                "steps": 2,
                "batch_size": 4,
                "eval_questions": 4,
                "out_dir": str(tmp_path / "r"),
            },
            "eval": {"beams": 1, "max_length": 8, "min_length": 1},
        }
    )
    result = train(tiny_config(tiny_dir), run, host)
    assert result["eval"]["samples"] == 4 and "cider" in " ".join(result["eval"]).lower()


def _keys_by_epoch(out: Path) -> dict[int, list[str]]:
    got: dict[int, list[str]] = {}
    for rank in (0, 1):
        for line in (out / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
            x = json.loads(line)
            got.setdefault(x["epoch"], []).extend(x["keys"])
    return got


def _lines(out: Path) -> list[list[str]]:
    return [(out / "keys" / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]


def test_torchrun_two_processes_two_workers_once_per_epoch_and_kill_resume(tiny_dir, tmp_path):
    """2 processes (torchrun, gloo) x 2 loader workers over 300 samples in 5 shards (uneven: 3
    shards on one process, 2 on the other): every key exactly once in epoch 0; killed (SIGKILL)
    after a few steps and resumed, the union of keys over both parts is one full epoch without
    duplicates, and the keys of every step are those of an uninterrupted run. Killed and resumed
    by one process with 3 workers instead: the union is still one epoch, each key once."""
    keys = write_shards(tmp_path / "sh", 5, 60)
    shards = str(tmp_path / "sh" / "s-{000000..000004}.tar")

    def cmd(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
            "-m", "prismkit.core.cli", "train", "tiny", *tiny_cli_sets(tiny_dir),
            "--set", 'data.dataset="webdataset_stream"',
            "--set", f'data.options={{shards="{shards}", shuffle_buffer=16}}',
            "--set", "data.workers=2", "--set", "data.record_keys=true",
            "--steps", "50", "--batch-size", "4", "--save-every", "5", "--eval-questions", "0",
            "--log-every", "10", "--out-dir", str(out), *extra,
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    full = tmp_path / "full"
    proc = subprocess.run(cmd(full), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_epoch = _keys_by_epoch(full)
    assert sorted(by_epoch[0]) == sorted(keys)  # each key exactly once in epoch 0
    assert by_epoch.get(1)  # and epoch 1 began
    result = json.loads((full / "result.json").read_text())
    assert result["ranks_in_sync"] is True and result["stream"]["bad"] == 0

    cut = tmp_path / "cut"
    saved = _kill_after(cmd(cut), cut, 12, env)
    proc = subprocess.run(
        cmd(cut, "--resume"), capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {cut / 'last'} at step {saved}" in proc.stdout
    by_epoch = _keys_by_epoch(cut)
    assert sorted(by_epoch[0]) == sorted(keys)  # union of both parts: one epoch, no duplicate
    assert _lines(cut) == _lines(full)  # the same order as the uninterrupted run

    # killed again, resumed by ONE process with 3 workers: the rest of epoch 0 is read once
    other = tmp_path / "other"
    saved = _kill_after(cmd(other), other, 12, env)
    one = cmd(other, "--resume", "--set", "data.workers=3")
    one = [sys.executable, *one[one.index("-m", 2) :]]  # no torchrun: one process
    one[one.index("--steps") + 1] = "80"  # one process needs more steps for the epoch's rest
    proc = subprocess.run(one, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed with another layout (2 x 2 -> 1 process(es) x 3 worker(s)" in proc.stdout
    by_epoch = _keys_by_epoch(other)
    assert sorted(by_epoch[0]) == sorted(keys)


def _kill_after(cmd: list[str], out: Path, step: int, env: dict) -> int:
    """Start ``cmd``, SIGKILL it (torchrun and every worker, by id) once rank 0 logged keys of
    ``step``; returns the step of the state it had saved."""
    import psutil

    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 300
    log0 = out / "keys" / "rank0.jsonl"
    while time.time() < deadline and p.poll() is None:
        if log0.exists() and any(
            json.loads(x)["step"] >= step for x in log0.read_text().splitlines() if x.strip()
        ):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    family = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    for pid in family:  # torchrun starts its workers in their own sessions: kill each, by id
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait()
    for pid in family[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)
    saved = json.loads((out / "last" / "state.json").read_text())["step"]
    assert 5 <= saved <= step
    return saved


def test_the_readme_run_config_builds(host):
    """The README's pre-training run config parses and builds its three weighted sources."""
    import re
    import tomllib

    from prismkit.core.data import build_dataset
    from prismkit.engine.train import RunConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "pretrain_mix" in b]
    run = RunConfig.from_dict(tomllib.loads(block))
    data = build_dataset(host.datasets, run.data.dataset, "train", **run.data.options)
    assert [(s.name, len(s.shards), s.weight) for s in data.sources] == [
        ("cc3m", 332, 1.0), ("coco", 60, 2.0), ("vg", 108, 0.5)
    ]  # fmt: skip
    assert data.sources[2].shards[0] == "pipe:curl -s -L https://host/vg/000000.tar"
    assert run.data.workers == 8 and data.shuffle_buffer == 5000


def test_bench_corpus_generator(tmp_path):
    """bench/stream_memory.py's synthetic corpus: n samples in ceil(n / per_shard) shards, read
    back by the stream; kept (not rewritten) when complete."""
    from prismkit.bench.stream_memory import make_corpus

    pattern = make_corpus(tmp_path, 25, per_shard=10, px=32)
    assert pattern.endswith("{000000..000002}.tar")
    first = (tmp_path / "25" / "000000.tar").stat().st_mtime_ns
    assert make_corpus(tmp_path, 25, per_shard=10, px=32) == pattern
    assert (tmp_path / "25" / "000000.tar").stat().st_mtime_ns == first
    keys = _slot_keys(WebDatasetStream(shards=pattern, shuffle_buffer=0), 0, 0, 1, 0)
    assert sorted(keys) == [f"{i:09d}" for i in range(25)]


def test_ctrl_c_to_the_process_group_saves_and_resumes(tiny_dir, tmp_path):
    """A terminal's Ctrl-C reaches the loader workers too: they leave it to the training
    process, which finishes its step (6 micro-batches: more than the workers had prefetched),
    saves and exits 130; --resume continues the epoch."""
    keys = write_shards(tmp_path / "sh", 4, 30)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "prismkit.core.cli", "train", "tiny", *tiny_cli_sets(tiny_dir),
        "--set", 'data.dataset="webdataset_stream"',
        "--set", f'data.options={{shards="{tmp_path}/sh/s-{{000000..000003}}.tar", shuffle_buffer=8}}',
        "--set", "data.workers=2", "--set", "data.record_keys=true",
        "--steps", "8", "--batch-size", "4", "--grad-accum", "6", "--eval-questions", "0",
        "--out-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # the whole group, as a terminal does
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    assert err.decode().count("SIGINT: stopping") == 1  # the training process's, not workers'

    result = json.loads((out / "result.json").read_text())
    assert result["interrupted"] == "SIGINT" and result["steps"] < 8
    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "keys" / "rank0.jsonl").read_text().splitlines()]
    epoch0 = [k for x in lines if x["epoch"] == 0 for k in x["keys"]]
    assert sorted(epoch0) == sorted(keys)
