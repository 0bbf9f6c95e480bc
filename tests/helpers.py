"""Test helpers: fake experts, tiny configs and batches (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

import torch

from prismkit import hookimpl
from prismkit.core.config import ModelConfig, load_config
from prismkit.core.expert import Expert, LabelMap
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import PrismerModel, SemanticInput
from prismkit.labels.feeder import expert_labels

WORDS = [
    "question",
    "answer",
    "what",
    "is",
    "the",
    "color",
    "shape",
    "of",
    "a",
    "an",
    "in",
    "image",
    "there",
    "does",
    "contain",
    "yes",
    "no",
    "circle",
    "rectangle",
    "triangle",
    "red",
    "green",
    "blue",
    "gray",
    "teal",
    "black",
    "yellow",
    "brown",
    "picture",
    "photo",
]


class FakeSemantic(Expert):
    """A semantic test expert: labels the left half 1 and the right half 2."""

    name = "fake_semantic"
    kind = "semantic"
    channels = 64

    def predict(self, images, inputs):
        b, _, h, w = images.shape
        idx = torch.ones(b, h, w, dtype=torch.long)
        idx[..., w // 2 :] = 2
        return LabelMap(idx, [["background", "left", "right"]] * b)


class FakeDense(Expert):
    """A dense 3-channel test expert that needs ``edge``: the RGB image times the edges."""

    name = "fake_dense"
    kind = "dense"
    channels = 3
    requires = ("edge",)

    def predict(self, images, inputs):
        return LabelMap(images * inputs["edge"].values)


class FakeInstances(Expert):
    """A semantic instance expert: two boxes per image, each its own instance of "thing"."""

    name = "fake_instances"
    kind = "semantic"
    channels = 64
    instances = True

    def predict(self, images, inputs):
        b, _, h, w = images.shape
        idx = torch.zeros(b, h, w, dtype=torch.long)
        idx[:, : h // 2, : w // 2] = 1
        idx[:, h // 2 :, w // 2 :] = 2
        return LabelMap(idx, [["background", "thing", "thing"]] * b)


class TestPlugin:
    __name__ = "test_plugin"

    @hookimpl
    def register_experts(self, register):
        register(FakeSemantic)
        register(FakeDense)
        register(FakeInstances)


def write_tokenizer(folder: Path) -> None:
    """A tiny lower-casing WordPiece tokenizer (BERT-style special tokens) saved to ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        ":",
        "?",
        ".",
        *"abcdefghijklmnopqrstuvwxyz",
    ]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(folder)


def tiny_config(tiny_dir: Path, name: str = "tiny", **fields) -> ModelConfig:
    """The registered tiny config with its backbones pointed at the saved tiny checkpoints (and
    the tiny tokenizer saved beside the BERT, 128 ids)."""
    host = get_plugin_manager()
    cfg = load_config(host.model_configs.get(name))
    cfg.vision.pretrained = str(tiny_dir / "clip")
    cfg.vision.act = "quick_gelu"
    cfg.language.pretrained = str(tiny_dir / "bert")
    cfg.language.tokenizer = None
    cfg.language.vocab_size = 128
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def tiny_cli_sets(tiny_dir: Path) -> list[str]:
    """``--set`` arguments that point the registered tiny configs at the saved tiny checkpoints
    (what :func:`tiny_config` does, for the command line)."""
    bert = tiny_dir / "bert"
    sets = [
        f'vision.pretrained="{tiny_dir / "clip"}"',
        'vision.act="quick_gelu"',
        f'language.pretrained="{bert}"',
        f'language.tokenizer="{bert}"',
        "language.vocab_size=128",
    ]
    return [a for s in sets for a in ("--set", s)]


def batch_for(model: PrismerModel, b: int = 2, seed: int = 0) -> dict:
    """Random images, expert labels from the real (or fake) expert plugins, and a short text."""
    g = torch.Generator().manual_seed(seed)
    s = model.config.vision.image_size
    images = torch.rand(b, 3, s, s, generator=g)
    host = get_plugin_manager(extra_plugins=[TestPlugin()])
    experts = {slot.name: host.expert(slot.name)() for slot in model.experts}
    labels = {}
    for name, out in expert_labels(experts, images).items():
        if out.names is None:
            labels[name] = out.values
        else:
            table = torch.randn(len(out.names[0]), experts[name].channels, generator=g)
            inst = out.values if experts[name].instances else None
            labels[name] = SemanticInput(out.values, table, inst)
    ids = torch.randint(5, 60, (b, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    tgt = ids.clone()
    tgt[:, :4] = -100
    tgt[mask == 0] = -100
    return {
        "images": images,
        "input_ids": ids,
        "attention_mask": mask,
        "labels": tgt,
        "experts": labels,
    }
