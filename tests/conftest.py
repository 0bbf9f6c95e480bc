"""Shared fixtures: tiny random backbones saved to disk and loaded through the real paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TestPlugin, tiny_config, write_tokenizer  # noqa: E402

from prismkit.core.config import ModelConfig  # noqa: E402
from prismkit.core.host import get_plugin_manager  # noqa: E402


@pytest.fixture(scope="session")
def host():
    return get_plugin_manager(extra_plugins=[TestPlugin()])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random CLIP vision, BERT and RoBERTa checkpoints (+ a WordPiece tokenizer)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        CLIPVisionConfig,
        CLIPVisionModel,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    clip.save_pretrained(root / "clip")
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=128,
    )
    BertForMaskedLM(BertConfig(max_position_embeddings=64, **common)).save_pretrained(root / "bert")
    write_tokenizer(root / "bert")
    RobertaForMaskedLM(
        RobertaConfig(max_position_embeddings=66, pad_token_id=1, **common)
    ).save_pretrained(root / "roberta")
    return root


@pytest.fixture
def tiny_cfg(tiny_dir) -> ModelConfig:
    return tiny_config(tiny_dir)
