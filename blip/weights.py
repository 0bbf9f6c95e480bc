"""Initial weights for BLIP pre-training: a BERT checkpoint for the text model (BLIP: the hub's
bert-base-uncased; offline: any BERT folder, e.g. the MiniLM package) and a timm-style ViT state
dict for the image encoder (BLIP: DeiT-B). Safe loading only: safetensors, or ``torch.load``
with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from prismkit.blip.convert import ConversionError, bert_key, vit_key
from prismkit.blip.med import MedLMHead, MedText
from prismkit.blip.vit import interpolate_pos_embed
from prismkit.core import weights as core_weights


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    return obj


def read_bert(source: str) -> dict[str, Tensor]:
    """A BERT checkpoint (folder with ``model.safetensors`` / ``pytorch_model.bin``, a file, a
    ``package:`` source or a hub id in the local cache) -> its state dict with the ``bert.``
    prefix of MLM/pre-training heads removed (``cls.*`` kept)."""
    resolved = core_weights.resolve(source)
    path = Path(resolved).expanduser()
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.bin"])
        )
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"{source}: no model.safetensors or pytorch_model.bin in {path}"
            )
    state = _read_tensors(path)
    return {(k[len("bert.") :] if k.startswith("bert.") else k): v for k, v in state.items()}


@torch.no_grad()
def load_bert(text: MedText, state: dict[str, Tensor]) -> list[str]:
    """Copy a BERT state into a MED text model as ``BertModel.from_pretrained`` +
    ``resize_token_embeddings`` do in BLIP: the vocabulary rows BERT has are copied (BLIP's two
    added tokens keep their N(0, 0.02) init), token types and pooler are dropped, and the
    cross-attention (not in BERT) keeps its init. A deeper BERT gives its first
    ``language.layers`` layers (a truncated init: the offline config's small MED from MiniLM).
    Returns the MED keys left at init."""
    own = text.state_dict()
    loaded = set()
    for key, value in state.items():
        if key.startswith("cls."):
            continue
        new = bert_key(key)
        if new is None:
            continue
        if new.startswith("layers.") and int(new.split(".")[1]) >= len(text.layers):
            continue
        if new not in own:
            raise ConversionError(f"BERT key {key} -> {new} is not in the text model")
        target = own[new]
        if new == "word_embeddings.weight" and value.shape[0] <= target.shape[0]:
            target[: value.shape[0]].copy_(value)
        elif value.shape != target.shape:
            raise ConversionError(
                f"BERT key {key} has shape {tuple(value.shape)}; the text model needs {tuple(target.shape)}: fix language.* sizes"
            )
        else:
            target.copy_(value)
        loaded.add(new)
    left = sorted(set(own) - loaded)
    if any(".cross_attn." not in k for k in left):
        raise ConversionError(
            f"the BERT checkpoint lacks {[k for k in left if '.cross_attn.' not in k][:5]}: it does not fit language.layers/width"
        )
    return left


@torch.no_grad()
def load_bert_lm_head(head: MedLMHead, state: dict[str, Tensor]) -> bool:
    """BERT's MLM head (``cls.predictions.transform``, ``bias``) when the checkpoint has one
    (bert-base-uncased does; sentence-embedding BERTs do not): True if loaded."""
    keys = {
        "cls.predictions.transform.dense.weight": head.dense.weight,
        "cls.predictions.transform.dense.bias": head.dense.bias,
        "cls.predictions.transform.LayerNorm.weight": head.norm.weight,
        "cls.predictions.transform.LayerNorm.bias": head.norm.bias,
    }
    if not all(k in state for k in keys):
        return False
    for k, p in keys.items():
        p.copy_(state[k])
    bias = state.get("cls.predictions.bias")
    if bias is not None:
        head.bias[: bias.shape[0]].copy_(bias)
    return True


@torch.no_grad()
def load_vit(vision: nn.Module, source: str) -> None:
    """A timm/DeiT ViT state dict (``.pth`` with ``{"model": ...}`` or ``.safetensors``) into
    BLIP's ViT; the classifier head is dropped and the position grid resized bicubically to the
    model's (BLIP's ``interpolate_pos_embed``). Strict on everything else."""
    path = Path(core_weights.resolve(source)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"vision.pretrained = {source!r}: no such file")
    state = {}
    for k, v in _read_tensors(path).items():
        if k.startswith(("head.", "head_dist.", "dist_token", "fc_norm.", "pre_logits.")):
            continue
        state[vit_key(k)] = v
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vision.grid)
    vision.load_state_dict(state, strict=True)
