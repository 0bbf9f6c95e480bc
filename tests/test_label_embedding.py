"""Label embeddings: MiniLM (offline default) and a tiny random CLIP text tower, the reproducible
PCA and its safetensors file, fixed rows, the cache, and the batch table fed to the model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prismkit.core.cli import build_parser  # noqa: E402
from prismkit.core.config import load_config  # noqa: E402
from prismkit.core.expert import LabelMap  # noqa: E402
from prismkit.core.host import get_plugin_manager  # noqa: E402
from prismkit.core.host import get_plugin_manager as _host  # noqa: E402
from prismkit.core.model import PrismerModel, SemanticInput  # noqa: E402
from prismkit.experts.segmentation import SuperpixelSegmentation  # noqa: E402
from prismkit.labels.embedding import (  # noqa: E402
    DEFAULT_ENCODER,
    GENERIC_LABELS,
    LabelEmbedder,
    LabelPCA,
    TextEncoder,
    clean_label,
    pca_vocabulary,
    semantic_input,
    unknown_vector,
)

CLIP_WORDS = ["dog", "cat", "sky", "road", "person", "tree", "wall", "car", "red", "blue"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    enc = TextEncoder()
    enc.load()
    return enc


@pytest.fixture(scope="module")
def embedder(minilm: TextEncoder) -> LabelEmbedder:
    return LabelEmbedder.fit(encoder=minilm)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random ``CLIPTextModelWithProjection`` + WordPiece tokenizer (CLS ... SEP)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        *CLIP_WORDS,
        *letters,
        *(f"##{c}" for c in letters),
    ]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=32
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ vocabulary and names
def test_clean_label_and_vocabulary() -> None:
    assert clean_label("wall-other-merged") == "wall"
    assert clean_label("  Sky-Other-Merged ") == "sky"
    assert clean_label("door-stuff") == "door"
    assert clean_label("traffic_light") == "traffic light"
    vocab = pca_vocabulary([SuperpixelSegmentation])
    assert len(vocab) == len(set(vocab)) >= 64
    assert "background" not in vocab and "" not in vocab
    assert vocab[:3] == list(GENERIC_LABELS[:3])

    class Closed(SuperpixelSegmentation):
        vocabulary = ("background", "zebra crossing", "person")

    assert pca_vocabulary([Closed])[:2] == ["zebra crossing", "person"]


# ------------------------------------------------------------------ MiniLM default
def test_minilm_embeddings_fixed_rows_and_cache(embedder: LabelEmbedder) -> None:
    assert embedder.pca.encoder == DEFAULT_ENCODER and embedder.dim == 64
    rows = embedder.embed(["dog", "background", "", "unknown", "  ", "cat", "skyscraper", "dog"])
    assert rows.shape == (8, 64) and rows.dtype == torch.float32
    assert torch.equal(rows[1], torch.zeros(64))
    for i in (2, 3, 4):
        assert torch.equal(rows[i], unknown_vector(64))
    assert math.isclose(float(unknown_vector(64).norm()), 1.0, rel_tol=1e-6)
    assert torch.allclose(rows[[0, 5, 6]].norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(rows[0], rows[7])
    # meaning survives the 64-d PCA: cat is nearer to dog than to a skyscraper
    assert float(rows[0] @ rows[5]) > float(rows[6] @ rows[5]) + 0.1
    # cached: a second call does not run the encoder
    calls = []
    real = embedder.encoder

    class Spy:
        source = real.source

        def __call__(self, names):
            calls.append(list(names))
            return real(names)

    embedder.encoder = Spy()  # type: ignore[assignment]
    try:
        assert torch.equal(embedder.embed(["cat", "dog"]), rows[[5, 0]])
        assert calls == []
        embedder.embed(["cat", "giraffe"])
        assert calls == [["giraffe"]]
    finally:
        embedder.encoder = real


def test_pca_is_reproducible_and_saved_without_pickle(
    embedder: LabelEmbedder, minilm: TextEncoder, tmp_path: Path
) -> None:
    again = LabelEmbedder.fit(encoder=minilm)
    assert torch.equal(again.pca.components, embedder.pca.components)
    assert torch.equal(again.pca.mean, embedder.pca.mean)
    pca = embedder.pca
    assert pca.components.shape == (64, 384) and pca.vocabulary == pca_vocabulary()
    assert torch.all(pca.explained_variance[:-1] >= pca.explained_variance[1:])
    assert 0.5 < float(pca.explained_variance_ratio.sum()) < 1.0
    path = tmp_path / "pca" / "label_pca.safetensors"
    pca.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = json.loads(header["__metadata__"]["prismkit"])
    assert meta["encoder"] == DEFAULT_ENCODER and meta["vocabulary"] == pca.vocabulary
    assert set(header) == {
        "__metadata__",
        "mean",
        "components",
        "explained_variance",
        "explained_variance_ratio",
    }
    loaded = LabelPCA.load(path)
    assert torch.equal(loaded.components, pca.components) and loaded.vocabulary == pca.vocabulary
    names = ["person", "wall-other-merged", "background"]
    # equal up to float rounding: padding differs with the names that share an encoder batch
    assert torch.allclose(
        LabelEmbedder(loaded, minilm).embed(names), embedder.embed(names), atol=1e-5
    )
    with pytest.raises(FileNotFoundError, match="fit-pca"):
        LabelPCA.load(tmp_path / "missing.safetensors")


def test_default_embedder(
    embedder: LabelEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PRISMKIT_LABEL_PCA", raising=False)
    fitted = LabelEmbedder.default()
    assert torch.equal(fitted.pca.components, embedder.pca.components)
    assert LabelEmbedder.default().pca is fitted.pca  # fitted once per process
    path = tmp_path / "pca.safetensors"
    LabelPCA(
        DEFAULT_ENCODER,
        ["a", "b"],
        torch.zeros(384),
        torch.eye(2, 384),
        torch.ones(2),
        torch.full((2,), 0.5),
    ).save(path)
    monkeypatch.setenv("PRISMKIT_LABEL_PCA", str(path))
    from_env = LabelEmbedder.default()
    assert from_env.dim == 2 and from_env.pca.vocabulary == ["a", "b"]


def test_mismatched_encoder_and_too_few_names(embedder: LabelEmbedder, tiny_clip: Path) -> None:
    with pytest.raises(ValueError, match="refit"):
        LabelEmbedder(embedder.pca, TextEncoder(str(tiny_clip)))
    with pytest.raises(ValueError, match="at least 64 distinct names"):
        LabelEmbedder.fit(["dog", "cat", "tree"], encoder=embedder.encoder)


# ------------------------------------------------------------------ batch table
def test_semantic_input_merges_names_and_matches_per_image_tiling(embedder: LabelEmbedder) -> None:
    g = torch.Generator().manual_seed(0)
    names = [
        ["background", "person", "dog"],
        ["background", "dog", "tree", "unknown"],
        ["background"],
    ]
    values = torch.stack([torch.randint(0, len(n), (6, 7), generator=g) for n in names])
    inp = semantic_input(LabelMap(values, names), embedder)
    assert isinstance(inp, SemanticInput)
    assert inp.table.shape == (5, 64)  # background, person, dog, tree, unknown
    assert inp.index.shape == values.shape and inp.index.dtype == torch.int64
    tiled = F.embedding(inp.index, inp.table)
    for b, image_names in enumerate(names):
        assert torch.equal(tiled[b], embedder.embed(image_names)[values[b]])
    with pytest.raises(
        ValueError, match="image 0: label indices span \\[3, 3\\] but it has 2 names"
    ):
        semantic_input(LabelMap(torch.full((1, 2, 2), 3), [["background", "dog"]]), embedder)
    with pytest.raises(ValueError, match="dense"):
        semantic_input(LabelMap(torch.rand(1, 1, 2, 2)), embedder)


def test_semantic_input_feeds_the_model(embedder: LabelEmbedder) -> None:
    host = get_plugin_manager()
    cfg = load_config(host.model_configs.get("tiny"))
    cfg.experts = ["edge", "seg_superpixel"]
    torch.manual_seed(0)
    model = PrismerModel.from_config(cfg, host).eval()
    images = torch.rand(2, 3, 32, 32)
    seg = SuperpixelSegmentation(n_segments=6).predict(images, {})
    inp = semantic_input(seg, embedder)
    edges = host.expert("edge")().predict(images, {}).values
    maps = model.expert_maps({"edge": edges, "seg_superpixel": inp}, 2)
    sem, instances = maps[1]
    assert sem.shape == (2, 64, 32, 32) and instances is None
    for b in range(2):
        want = embedder.embed(seg.names[b])[seg.values[b]].permute(2, 0, 1)
        assert torch.allclose(sem[b], want)
    with torch.no_grad():
        tokens = model.encode_image(images, {"edge": edges, "seg_superpixel": inp})
    assert torch.isfinite(tokens).all()


# ------------------------------------------------------------------ CLIP text tower
def test_clip_text_tower_path(tiny_clip: Path) -> None:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    enc = TextEncoder(str(tiny_clip))
    out = enc(["dog", "red car"])
    assert enc._clip and out.shape == (2, 16)
    model = CLIPTextModelWithProjection.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)(
        ["dog", "red car"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        want = F.normalize(model(**tok).text_embeds, dim=-1)
    assert torch.allclose(out, want, atol=1e-5)
    emb = LabelEmbedder.fit(CLIP_WORDS, encoder=enc, dim=8)
    assert emb.pca.encoder == str(tiny_clip) and emb.embed(["dog", "background"]).shape == (2, 8)


def test_fit_pca_command(tiny_clip: Path, tmp_path: Path, capsys) -> None:
    words = tmp_path / "words.txt"
    words.write_text("zebra crossing\n\nlamp post\n")
    out = tmp_path / "label_pca.safetensors"
    parser = build_parser(_host())
    args = parser.parse_args(
        ["experts", "fit-pca", "-o", str(out), "--encoder", str(tiny_clip), "--dim", "8",
         "--words", str(words)]
    )  # fmt: skip
    assert args.func(args) == 0
    assert f"wrote {out}: 8-d PCA" in capsys.readouterr().out
    pca = LabelPCA.load(out)
    assert pca.dim == 8 and pca.encoder == str(tiny_clip)
    assert pca.vocabulary[-2:] == ["zebra crossing", "lamp post"]
    assert LabelEmbedder.from_file(out).embed(["sky"]).shape == (1, 8)
