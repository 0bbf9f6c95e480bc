"""Expert labels of webdataset shards: one file per (shard, expert), written by
``prismkit experts run --shards`` (resumable shard by shard, sharded like the per-image run) and
streamed with the images into training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from stream_helpers import png_bytes, write_shards

from prismkit.core.cli import build_parser
from prismkit.core.data import DataError
from prismkit.core.host import get_plugin_manager
from prismkit.core.shards import image_of, read_shard, shard_id
from prismkit.engine.train import RunConfig, train
from prismkit.experts.edges import CannyEdges
from prismkit.labels.shard_runner import run_experts_on_shards
from prismkit.labels.shard_store import ShardLabelStore, StreamLabels
from prismkit.labels.store import roundtrip


def _corpus(tmp_path: Path) -> str:
    import webdataset as wds

    write_shards(tmp_path / "sh", 3, 5)
    with wds.TarWriter(str(tmp_path / "sh" / "s-000003.tar")) as w:
        w.write({"__key__": "broken", "png": b"not an image", "txt": "red circle"})
        w.write({"__key__": "good", "png": png_bytes(7, 12), "txt": "blue square"})
    return str(tmp_path / "sh" / "s-{000000..000003}.tar")


def test_shard_ids():
    assert shard_id("/data/cc3m/000012.tar") == "cc3m_000012"
    assert shard_id("pipe:curl -s https://host/laion/00001.tar") == "laion_00001"
    assert shard_id("x.tar") == "x"


def test_labels_per_shard_resumable_and_exact(tmp_path):
    pattern = _corpus(tmp_path)
    store = ShardLabelStore(tmp_path / "labels")
    report = run_experts_on_shards(
        [pattern], {"edge": CannyEdges()}, store, batch_size=3, shard=(0, 1)
    )
    assert report.computed == 4 and report.images == 17
    assert [f.message for f in report.failures] == [
        f"shard {tmp_path}/sh/s-000003.tar: sample broken: image .png cannot be decoded "
        f"(UnidentifiedImageError: cannot identify image file); no labels computed for it"
    ]
    files = sorted((tmp_path / "labels" / "edge" / "v1" / "native").glob("*.safetensors"))
    assert [f.name for f in files] == [f"sh_s-00000{i}.safetensors" for i in range(4)]

    # what is stored is what the expert computes on the decoded image (float16 round trip)
    url = f"{tmp_path}/sh/s-000001.tar"
    raw = next(iter(read_shard(url, print)))
    image = image_of(raw, "x")[None]
    want = roundtrip(CannyEdges().predict(image, {}), "dense")
    got = store.open(url, CannyEdges).get(raw["__key__"])
    torch.testing.assert_close(got.values, want.values)

    # resumable shard by shard: nothing to do; a deleted or truncated file is recomputed alone
    again = run_experts_on_shards([pattern], {"edge": CannyEdges()}, store, shard=(0, 1))
    assert (again.computed, again.skipped) == (0, 4)
    files[0].unlink()
    files[2].write_bytes(files[2].read_bytes()[:-50])
    third = run_experts_on_shards([pattern], {"edge": CannyEdges()}, store, shard=(0, 1))
    assert (third.computed, third.skipped) == (2, 2)
    # sharded across machines: rank 1 of 2 takes shards 1 and 3
    other = ShardLabelStore(tmp_path / "ranked")
    r1 = run_experts_on_shards([pattern], {"edge": CannyEdges()}, other, shard=(1, 2))
    assert r1.computed == 2
    names = sorted(p.name for p in (tmp_path / "ranked").rglob("*.safetensors"))
    assert names == ["sh_s-000001.safetensors", "sh_s-000003.safetensors"]


def test_missing_or_damaged_labels_are_named(tmp_path):
    pattern = _corpus(tmp_path)
    store = ShardLabelStore(tmp_path / "labels")
    url = f"{tmp_path}/sh/s-000000.tar"
    with pytest.raises(
        DataError,
        match=r"s-000000.tar: no 'edge' labels .* does not exist: run `prismkit experts run --shards",
    ):
        store.open(url, CannyEdges)
    run_experts_on_shards([pattern], {"edge": CannyEdges()}, store, shard=(0, 1))
    labels = StreamLabels(store.root, [CannyEdges])
    raws = [r for r in read_shard(url, print)][:2]
    out = labels.batch(raws, 16)
    assert out["edge"].values.shape == (2, 1, 16, 16)
    with pytest.raises(DataError, match=r"sample nokey has no 'edge' labels"):
        labels.batch([{"__key__": "nokey", "__url__": url}], 16)
    path = store.path(url, CannyEdges)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a bit inside the last tensor
    path.write_bytes(bytes(data))
    last = [r for r in read_shard(url, print)][-1]
    with pytest.raises(DataError, match="damaged .checksum mismatch."):
        StreamLabels(store.root, [CannyEdges]).batch([last], 16)


def test_training_streams_images_and_labels(tmp_path, tiny_dir, monkeypatch):
    """The tiny Prismer (edge expert) trains on shards with labels from the shard store; the
    expert never runs during training; labels missing from the store stop the run, named."""
    pattern = _corpus(tmp_path)
    host = get_plugin_manager()
    cfg = tiny_config(tiny_dir)
    labels = tmp_path / "labels"
    parser = build_parser(host)
    args = parser.parse_args(
        ["experts", "run", "--shards", pattern, "--store", str(labels), "--experts", "edge",
         "--device", "cpu", "--size", "32", "--workers", "2"]
    )  # fmt: skip
    assert args.func(args) == 1  # the broken image is a failure, named
    calls = []
    monkeypatch.setattr(CannyEdges, "predict", lambda self, *a: calls.append(1))
    out = tmp_path / "run"
    run = RunConfig.from_dict(
        {
            "data": {
                "dataset": "webdataset_stream",
                "options": {"shards": pattern, "shuffle_buffer": 4},
                "labels": str(labels),
                "workers": 2,
            },
            "train": {"steps": 5, "batch_size": 4, "eval_questions": 0, "out_dir": str(out)},
        }
    )
    result = train(cfg, run, host)
    assert result["steps"] == 5 and not calls
    assert result["stream"]["bad"] == 1 and "sample broken" in result["stream"]["bad_examples"][0]
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["loss"] > 0
    run.data.labels = str(tmp_path / "empty")
    run.train.out_dir = str(tmp_path / "run2")
    with pytest.raises(DataError, match=r"no 'edge' labels .*run `prismkit experts run --shards"):
        train(cfg, run, host)
