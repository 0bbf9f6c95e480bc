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

from prismkit import hookimpl
from prismkit.core.cli import build_parser
from prismkit.core.data import DataError, Sample
from prismkit.core.expert import Expert, LabelMap, WeightsStatus
from prismkit.core.host import PluginsConfig, get_plugin_manager
from prismkit.core.model import create_model
from prismkit.core.processor import Processor
from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train
from prismkit.muvla import commands as muvla_commands
from prismkit.muvla import corpus as muvla_corpus
from prismkit.muvla import data as muvla_data
from prismkit.muvla import objective as muvla_objective
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
    assert "skipped 1 image(s) with no tags" in report.summary()
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
    # the retrieval embeddings beside the pairs: each row's tag query and its sentence
    tags, sents = muvla_corpus.read_embeddings(out)
    assert tags.shape == sents.shape == (6, DIM) and tags.dtype == torch.float16
    for n, r in enumerate(rows):
        torch.testing.assert_close(
            tags[n].float(), bow_encoder([", ".join(r["tags"])])[0].half().float()
        )
        torch.testing.assert_close(sents[n].float(), bow_encoder([r["sentence"]])[0].half().float())
        assert float(tags[n].float() @ sents[n].float()) == pytest.approx(r["score"], abs=2e-3)
    out.write_text(out.read_text().replace("red", "blue"))  # an edited JSONL no longer matches
    with pytest.raises(DataError, match="was not written for this"):
        muvla_corpus.read_embeddings(out)


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
    itm = model.objective.itm_head
    for p in (lang.layers[0].cross_attn.out_proj.weight, lang.head.dense.weight, itm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.requires_grad for p in itm.parameters())  # the ITM head trains, and is saved
    from prismkit.core.checkpoint import checkpoint_state

    assert {"objective.itm_head.weight", "objective.itm_head.bias"} <= set(checkpoint_state(model))
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
    # the loop's optimizer step, when given, drives the warm-up (not the forward count)
    assert float(model(**batch, step=1).parts["weighted"]) == 0.0
    assert float(model(**batch, step=2).parts["weighted"]) == 1.0
    q = [float(parts[k]) for k in ("w_min", "w_q25", "w_median", "w_q75", "w_max")]
    assert q == sorted(q) and q[0] > 0 and q[-1] < 1
    model.objective.warmup_epochs = 1  # an epoch passed through the extras takes over
    assert float(model(**batch, epoch=0).parts["weighted"]) == 0.0
    assert float(model(**batch, epoch=1).parts["weighted"]) == 1.0


def test_muvla_warmup_counts_optimizer_steps_and_resumes(tiny_dir, muvla_host):
    """The loop's ``begin_step`` drives the warm-up, not the forward count (gradient accumulation
    runs several forwards per step), and the counters travel in checkpoints."""
    from prismkit.core.checkpoint import checkpoint_state

    torch.manual_seed(0)
    model, batch = _model_and_batch(tiny_dir, muvla_host, warmup_steps=2)
    model.train()
    flags = []
    for step in range(3):
        model.begin_step(step)
        flags += [float(model(**batch).parts["weighted"]) for _ in range(2)]  # 2 micro-batches
    assert flags == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    state = checkpoint_state(model)
    assert int(state["objective.step"]) == 2 and int(state["objective.calls"]) == 6
    fresh, _ = _model_and_batch(tiny_dir, muvla_host, warmup_steps=2)
    assert not fresh.load_state_dict(state, strict=False).unexpected_keys  # state is partial
    fresh.train()
    assert float(fresh(**batch).parts["weighted"]) == 1.0  # resumed past the warm-up


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
    assert (args.k, args.shard_size, args.tags_expert) == (5, 100_000, "auto")


# -- tags by capability --------------------------------------------------------------------------
class FakeDetector(Expert):
    """A detection expert whose weights are here unless ``AVAILABLE`` says otherwise."""

    name = "fake_detector"
    kind = "semantic"
    channels = 64
    tag_source = "detection"
    available = True

    def weights_status(self):
        return WeightsStatus(self.available, "here" if self.available else "not downloaded")

    def predict(self, images, inputs):
        b, _, h, w = images.shape
        return LabelMap(torch.zeros(b, h, w, dtype=torch.long), [["background"]] * b)

    def tags(self, images):
        return [["dog", "frisbee"] for _ in images]


class DetectorPlugin:
    __name__ = "detector_plugin"

    @hookimpl
    def register_experts(self, register):
        register(FakeDetector)


def _tag_host(experts):
    return get_plugin_manager(PluginsConfig(experts=experts), extra_plugins=[DetectorPlugin()])


def test_tags_come_from_a_detection_expert_when_one_is_enabled(monkeypatch):
    tagger, why = muvla_corpus.choose_tagger(_tag_host(["fake_detector", "obj_tags_cam", "edge"]))
    assert isinstance(tagger, FakeDetector) and why == "detection tags from expert 'fake_detector'"
    # not enabled in plugins.toml: the classifier tags are the fallback
    tagger, why = muvla_corpus.choose_tagger(_tag_host(["obj_tags_cam", "edge"]))
    assert tagger.name == "obj_tags_cam" and tagger.tag_source == "classifier"
    assert why == "classifier tags from expert 'obj_tags_cam' (no detection expert is enabled)"
    # enabled but without its weights here: fallback, saying why
    monkeypatch.setattr(FakeDetector, "available", False)
    tagger, why = muvla_corpus.choose_tagger(_tag_host(["fake_detector", "obj_tags_cam"]))
    assert tagger.name == "obj_tags_cam" and "fake_detector: not downloaded" in why
    with pytest.raises(ValueError, match="no enabled expert can tag"):
        muvla_corpus.choose_tagger(_tag_host(["fake_detector", "edge"]))
    # by name: only an expert that declares tags
    tagger, _ = muvla_corpus.choose_tagger(_tag_host(["fake_detector"]), "fake_detector")
    assert isinstance(tagger, FakeDetector)
    with pytest.raises(ValueError, match="lists no tags"):
        muvla_corpus.choose_tagger(_tag_host(["edge"]), "edge")
    # every registered expert that declares a tag source implements tags()
    host = get_plugin_manager()
    for name in host.experts.names():
        cls = host.experts.get(name)
        assert (cls.tag_source is None) == (cls.tags is Expert.tags), name


# -- hard negatives ------------------------------------------------------------------------------
def test_negatives_follow_retrieval_similarity_never_the_same_image():
    # rows 0 and 1 come from one image (same tags); rows 2 and 3 share a sentence
    tag_ids = torch.tensor([[2, 5, 3], [2, 5, 3], [2, 6, 3], [2, 7, 3]])
    sent_ids = torch.tensor([[2, 10, 3], [2, 11, 3], [2, 12, 3], [2, 12, 3]])
    ones = torch.ones_like(tag_ids)
    excluded = muvla_objective.same_rows(tag_ids, ones) | muvla_objective.same_rows(sent_ids, ones)
    assert excluded.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]
    sim = torch.tensor(
        [[1.0, 0.9, 0.8, 0.2], [0.9, 1.0, 0.1, 0.5], [0.3, 0.7, 1.0, 0.9], [0.4, 0.6, 1.0, 1.0]]
    )
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [muvla_objective.draw_negatives(sim, excluded, 0.1, g)[0] for _ in range(2000)]
    )
    assert not excluded[torch.arange(4), draws].any()  # never the same image or sentence
    p0 = float((draws[:, 0] == 2).float().mean())  # softmax([0.8, 0.2] / 0.1)[0] = 0.9975
    assert p0 > 0.99
    p2 = float((draws[:, 2] == 1).float().mean())  # softmax([0.3, 0.7] / 0.1)[1] = 0.982
    assert 0.96 < p2 < 0.995
    idx, valid = muvla_objective.draw_negatives(None, excluded, 0.1, g)
    assert valid.all() and not excluded[torch.arange(4), idx].any()
    alone = torch.ones(2, 2, dtype=torch.bool)  # one image in the batch: no negative at all
    assert not muvla_objective.draw_negatives(None, alone, 0.1)[1].any()


# -- RoBERTa-style (byte-level BPE) tokenizer ----------------------------------------------------
def byte_level_tokenizer():
    """A small byte-level BPE tokenizer with RoBERTa's special tokens and space marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["a red circle , a blue square , and a green shape ."] * 50
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def test_byte_level_punctuation_is_never_an_mlm_target(tiny_dir):
    tok = byte_level_tokenizer()
    cfg = tiny_config(tiny_dir)
    cfg.language.vocab_size = len(tok)  # the processor checks the ids fit the model
    proc = Processor(tok, cfg)
    sentence = "a red circle , a blue square ."
    ids = tok(sentence, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "Ġ," in pieces and "Ġ." in pieces and "Ġ".isalnum()  # the trap: the marker is a letter
    words = muvla_data.maskable(tok, ids)
    assert [p for p, w in zip(pieces, words, strict=True) if not w] == ["Ġ,", "Ġ."]
    batch = muvla_data.collate_pairs(proc, [Sample(torch.rand(3, 32, 32), "a", "circle", sentence)])
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    rec = muvla_data.extras_from_encoded(proc, **plain)
    for extras in (batch, rec):  # both ways of building the batch agree
        sent = extras["sent_ids"][0][extras["sent_words"][0]].tolist()
        assert set(tok.convert_ids_to_tokens(sent)) == {
            "a",
            "Ġred",
            "Ġcircle",
            "Ġa",
            "Ġblue",
            "Ġsquare",
        }


def test_build_then_train_with_retrieval_negatives(tiny_dir, muvla_host, tmp_path, corpus):
    colours = [(250, 10, 10), (10, 250, 10), (240, 20, 20), (20, 240, 20)]
    images = write_images(tmp_path / "img", colours)
    out = tmp_path / "pairs.jsonl"
    muvla_corpus.build_pairs(
        images, corpus, out, tagger=ColourTagger(), encoder=bow_encoder, k=2, shard_size=4
    )
    data = muvla_data.MuVLAPairs(pairs=str(out))
    assert len(data) == 8 and set(data[0].extras) == {"tag_emb", "sent_emb"}
    run = RunConfig(
        data=DataConfig(dataset="muvla_pairs", options={"pairs": str(out)}),
        train=TrainConfig(
            steps=2, batch_size=4, warmup=1, eval_questions=0, out_dir=str(tmp_path / "run")
        ),
    )
    cfg = tiny_config(tiny_dir, head="muvla", max_text_len=48)  # tags + sentence fit untruncated
    result = train(cfg, run, muvla_host)
    assert math.isfinite(result["final_loss"])
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for rec in log:  # the weights' distribution and the negatives' retrieval similarity per step
        parts = rec["parts"]
        assert {"w_min", "w_median", "w_max", "itm_acc", "neg_sim", "pos_sim"} <= set(parts)
        assert parts["neg_sim"] <= parts["pos_sim"] + 1e-6


def test_negatives_option_and_match_probability(tiny_dir, muvla_host, monkeypatch):
    torch.manual_seed(0)
    model, batch = _model_and_batch(tiny_dir, muvla_host)
    batch["tag_emb"], batch["sent_emb"] = torch.randn(3, 8), torch.randn(3, 8)
    seen = []
    draw = muvla_objective.draw_negatives

    def spy(sim, excluded, temperature, generator=None):
        seen.append(sim)
        return draw(sim, excluded, temperature, generator)

    monkeypatch.setattr(muvla_objective, "draw_negatives", spy)
    model.eval()
    with torch.no_grad():
        parts = model(**batch).parts
        torch.testing.assert_close(seen[-1], batch["tag_emb"] @ batch["sent_emb"].T)
        model.objective.negatives = "random"  # the paper's random pairs (never the same image)
        model(**batch)
        assert seen[-1] is None
    probs = model.objective.match_probability(
        model, batch["images"], batch["sent_ids"], batch["sent_mask"], batch["experts"]
    )
    torch.testing.assert_close(probs.mean(), parts["match_prob"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="negatives"):
        muvla_objective.MuVLAObjective(width=32, negatives="hardest")


def test_itm_weight_covers_the_positive_and_the_negative(tiny_dir, muvla_host, monkeypatch):
    torch.manual_seed(0)
    model, batch = _model_and_batch(tiny_dir, muvla_host, warmup_steps=0)
    roll = torch.tensor([1, 2, 0])

    def fixed(sim, excluded, temperature, generator=None):
        return roll, torch.ones(3, dtype=torch.bool)

    monkeypatch.setattr(muvla_objective, "draw_negatives", fixed)
    model.eval()
    obj = model.objective
    with torch.no_grad():
        parts = model(**batch).parts
        ids, mask = batch["sent_ids"], batch["sent_mask"]
        vision = model.encode_image(batch["images"], batch["experts"])
        pos, _ = model.language(ids, vision, mask, prefix_len=mask.sum(1))
        neg, _ = model.language(ids[roll], vision, mask[roll], prefix_len=mask[roll].sum(1))
        pos, neg = obj.itm_logits(pos), obj.itm_logits(neg)
    w = pos.softmax(-1)[:, 1]
    ce_pos = torch.nn.functional.cross_entropy(
        pos, torch.ones(3, dtype=torch.long), reduction="none"
    )
    ce_neg = torch.nn.functional.cross_entropy(
        neg, torch.zeros(3, dtype=torch.long), reduction="none"
    )
    assert float(parts["weighted"]) == 1.0
    torch.testing.assert_close(
        parts["itm"], (w * (ce_pos + ce_neg)).sum() / 6, rtol=1e-5, atol=1e-6
    )
