"""mu-VLA: the retrieval corpus builder, the objective and a short training run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TestPlugin, tiny_config
from PIL import Image

from prismkit.core.cli import build_parser
from prismkit.core.data import Sample
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import create_model
from prismkit.core.processor import Processor
from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train
from prismkit.muvla import commands as muvla_commands
from prismkit.muvla import corpus as muvla_corpus
from prismkit.muvla import data as muvla_data
from prismkit.muvla import plugin as muvla_plugin

DIM = 64


def bow_encoder(texts):
    """A deterministic bag-of-words encoder: hashed word counts, L2-normalised ``(N, DIM)``."""
    out = torch.zeros(len(texts), DIM)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            out[i, sum(map(ord, w)) * 7919 % DIM] += 1.0
    return torch.nn.functional.normalize(out + 1e-3, dim=-1)


class ColourTagger:
    """Tags from the dominant channel: red -> ["red", "circle"], green -> ["green", "square"],
    blue -> no tags."""

    name = "colour_tagger"

    def tags(self, images):
        means = images.mean(dim=(2, 3))
        names = [["red", "circle"], ["green", "square"], []]
        return [list(names[int(m.argmax())]) for m in means]


def write_images(folder: Path, colours: list[tuple[int, int, int]], size: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(colours):
        p = folder / f"img{i}.png"
        Image.fromarray(np.full((size, size, 3), c, dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


CORPUS = [
    "a red circle on a white page",
    "  a red circle on a white page  ",  # duplicate after stripping
    "",
    "a green square drawn with a pen",
    "the stock market fell sharply today",
    "   ",
    "Красный круг на белом фоне",
    "一个红色的圆圈",
    "a small red ball and a circle",
    "green grass in a square park",
    "the stock market fell sharply today",  # duplicate
    "rain is expected over the weekend",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    return p


# -- index -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [1, 3, 7, 16, 50, 1000])
@pytest.mark.parametrize("k", [1, 5, 60])
def test_streaming_topk_equals_brute_force(shard, k):
    g = torch.Generator().manual_seed(shard * 100 + k)
    q, emb = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g)
    ids = torch.arange(50) * 3 + 11  # payload ids, not positions
    chunks = ((emb[j : j + shard], ids[j : j + shard]) for j in range(0, 50, shard))
    s, i = muvla_corpus.streaming_topk(q, chunks, k)
    ref_s, ref_i = (q @ emb.T).topk(min(k, 50), dim=1)
    assert torch.equal(i, ids[ref_i])
    assert torch.allclose(s, ref_s, atol=1e-6)


def test_clean_counts(corpus):
    stats = muvla_corpus.CleanStats()
    kept = list(muvla_corpus.iter_clean_corpus(corpus, stats))
    assert stats.lines == len(CORPUS)
    assert (stats.kept, stats.empty, stats.duplicates, stats.non_english) == (6, 2, 2, 2)
    assert stats.kept + stats.empty + stats.duplicates + stats.non_english == stats.lines
    assert kept[0][1] == "a red circle on a white page"
    with open(corpus, "rb") as f:  # offsets point at the lines
        assert all(muvla_corpus.read_sentence(f, o) == t for o, t in kept)
    kept_all = list(
        muvla_corpus.iter_clean_corpus(corpus, muvla_corpus.CleanStats(), drop_non_english=False)
    )
    assert len(kept_all) == 8


def test_builder_skips_untagged_and_writes_valid_jsonl(tmp_path, corpus):
    images = write_images(tmp_path / "img", [(250, 10, 10), (10, 10, 250), (10, 250, 10)])
    out = tmp_path / "pairs.jsonl"
    report = muvla_corpus.build_pairs(
        images, corpus, out, tagger=ColourTagger(), encoder=bow_encoder, k=3, shard_size=2
    )
    assert report.no_tags == [images[1]]
    assert "skipped 1 image(s) with no detection tags" in report.summary()
    assert report.shards == 3 and report.rows == 6
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["image"] for r in rows} == {images[0], images[2]}
    for img in (images[0], images[2]):
        mine = [r for r in rows if r["image"] == img]
        assert [r["rank"] for r in mine] == [1, 2, 3]
        assert all(a["score"] >= b["score"] for a, b in zip(mine, mine[1:], strict=False))
    assert "red" in rows[0]["sentence"]
    assert rows[0]["tags"] == ["red", "circle"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # the sharded search equals brute force over all kept sentences
    kept = [t for _, t in muvla_corpus.iter_clean_corpus(corpus, muvla_corpus.CleanStats())]
    emb = bow_encoder(kept).half().float()
    q = bow_encoder(["red, circle"])
    ref = (q @ emb.T).topk(3, dim=1)
    assert [r["score"] for r in rows[:3]] == pytest.approx(ref.values[0].tolist(), abs=1e-4)
    assert rows[0]["sentence"] == kept[int(ref.indices[0, 0])]  # (ranks 3+ tie here)


def test_builder_resumes_and_keeps_old_output_on_failure(tmp_path, corpus):
    images = write_images(tmp_path / "img", [(250, 10, 10)])
    out = tmp_path / "pairs.jsonl"
    first = muvla_corpus.build_pairs(
        images, corpus, out, tagger=ColourTagger(), encoder=bow_encoder, shard_size=3
    )
    before = out.read_text()
    again = muvla_corpus.build_pairs(
        images, corpus, out, tagger=ColourTagger(), encoder=bow_encoder, shard_size=3
    )
    assert again.shards_reused == again.shards == first.shards == 2
    assert out.read_text() == before

    class Broken:
        def tags(self, images):
            raise RuntimeError("tagger crashed")

    with pytest.raises(RuntimeError):
        muvla_corpus.build_pairs(
            images, corpus, out, tagger=Broken(), encoder=bow_encoder, shard_size=3
        )
    assert out.read_text() == before  # atomic: the old file is untouched


def test_noun_phrase_spans():
    s = "the big red circle sits on a mat, near circles"
    spans = muvla_data.noun_phrase_spans(s, ["circle", "envelope"])
    assert [s[a:b] for a, b in spans] == ["big red circle sits", "circles"]
    assert muvla_data.noun_phrase_spans("a dog", ["cat"]) == []


# -- objective and training --------------------------------------------------------------------
@pytest.fixture(scope="module")
def muvla_host():
    base = get_plugin_manager()
    plugins = [TestPlugin()] + ([] if "muvla" in base.heads else [muvla_plugin])
    return get_plugin_manager(extra_plugins=plugins)


def _model_and_batch(tiny_dir, host, warmup_steps=1000):
    cfg = tiny_config(tiny_dir, head="muvla")
    model = create_model(cfg, host)
    model.objective.warmup_steps = warmup_steps
    proc = Processor.from_config(cfg)
    samples = [
        Sample(torch.rand(3, 32, 32), "a", "circle, red", "a red circle in the image"),
        Sample(torch.rand(3, 32, 32), "b", "triangle", "a blue triangle"),
        Sample(torch.rand(3, 32, 32), "c", "rectangle, gray", "a gray shape"),
    ]
    batch = muvla_data.collate_pairs(proc, samples)
    batch["experts"] = {"edge": torch.rand(3, 1, 32, 32)}
    return model, batch


def test_objective_parts_finite_with_gradients(tiny_dir, muvla_host):
    torch.manual_seed(0)
    model, batch = _model_and_batch(tiny_dir, muvla_host)
    assert batch["np_mask"].sum(1).tolist()[:2] == [2, 2]  # "red circle", "blue triangle"
    model.train()
    out = model(**batch)
    assert set(out.parts) >= {"tag", "np", "itm", "mlm", "match_prob", "weighted"}
    assert all(math.isfinite(float(v)) for v in out.parts.values())
    out.loss.backward()
    lang = model.language
    for p in (lang.layers[0].cross_attn.out_proj.weight, lang.head.dense.weight, lang.head.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the plain encode(prompt=tags, target=sentence) batch gives the same extras
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    rec = muvla_data.extras_from_encoded(model.objective.vocab(model).processor, **plain)
    for key in ("tag_ids", "tag_words", "sent_ids", "sent_words", "np_mask"):
        assert torch.equal(rec[key], batch[key]), key


def test_itm_weighting_switches_on_after_warmup(tiny_dir, muvla_host):
    torch.manual_seed(0)
    model, batch = _model_and_batch(tiny_dir, muvla_host, warmup_steps=2)
    model.train()
    flags = [float(model(**batch).parts["weighted"]) for _ in range(3)]
    assert flags == [0.0, 0.0, 1.0]
    parts = model(**batch).parts
    assert torch.isclose(parts["pair_weight"], parts["match_prob"])
    assert 0 < float(parts["pair_weight"]) < 1
    model.objective.warmup_epochs = 1  # an epoch passed through the extras takes over
    assert float(model(**batch, epoch=0).parts["weighted"]) == 0.0
    assert float(model(**batch, epoch=1).parts["weighted"]) == 1.0


def test_two_training_steps(tiny_dir, muvla_host, tmp_path):
    images = write_images(tmp_path / "img", [(250, 10, 10), (10, 250, 10), (250, 250, 10)])
    rows = [
        {"image": images[0], "sentence": "a red circle", "score": 0.9, "rank": 1, "tags": ["red"]},
        {
            "image": images[1],
            "sentence": "a green square",
            "score": 0.8,
            "rank": 1,
            "tags": ["green", "square"],
        },
        {
            "image": Path(images[2]).relative_to(tmp_path).as_posix(),
            "sentence": "a yellow shape",
            "score": 0.7,
            "rank": 1,
            "tags": ["yellow"],
        },
        {"image": images[2], "sentence": "no", "score": 0.1, "rank": 6, "tags": ["x"]},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = muvla_data.MuVLAPairs(pairs=str(pairs))
    assert len(data) == 3 and data[0].prompt == "red" and data[1].prompt == "green, square"
    run = RunConfig(
        data=DataConfig(dataset="muvla_pairs", options={"pairs": str(pairs)}),
        train=TrainConfig(
            steps=2,
            batch_size=2,
            warmup=1,
            eval_questions=0,
            log_every=1,
            out_dir=str(tmp_path / "run"),
        ),
    )
    result = train(tiny_config(tiny_dir, head="muvla"), run, muvla_host)
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cli_parser():

    parser = build_parser(get_plugin_manager())
    args = parser.parse_args(
        ["muvla", "build", "--images", "d", "--corpus", "c.txt", "--out", "p.jsonl"]
    )
    assert args.func is muvla_commands.cmd_build
    assert (args.k, args.shard_size, args.tags_expert) == (5, 100_000, "obj_tags_cam")
