"""Checkpoints: safetensors of the trainable weights, with the resolved config and plugin versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prismkit.core.config import ModelConfig
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.core.model import PrismerModel, create_model

FORMAT = "prismkit-checkpoint-1"


def checkpoint_state(model: PrismerModel) -> dict[str, torch.Tensor]:
    """Weights a checkpoint must hold: the trainable ones, plus frozen ones that no pretrained
    source can restore (a backbone with ``pretrained = None``), plus BatchNorm statistics."""
    vc, lc = model.config.vision, model.config.language
    unsourced = []
    if not vc.pretrained:
        unsourced.append("vision.")
    if not lc.pretrained:
        unsourced.append("language.")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    stem_buffers = {f"expert_stems.{n}" for n, _ in model.expert_stems.named_buffers()}
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        # a stem that loads its own pretrained trunk needs no copy in the checkpoint
        cnn_trunk = name.startswith("vision.stem.") and not model.vision.stem.weights_in_backbone
        if (
            id(t) in trainable
            or name in stem_buffers
            or (name.startswith(tuple(unsourced)) and not cnn_trunk)
        ):
            state[name] = t.detach().contiguous().cpu()
    return state


def save_checkpoint(
    model: PrismerModel,
    path: str | Path,
    host: PluginHost | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``path`` (a .safetensors file) atomically."""
    host = host or get_plugin_manager()
    meta = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "plugins": json.dumps(
            {p.name: {"distribution": p.distribution, "version": p.version} for p in host.plugins}
        ),
        "extra": json.dumps(extra or {}),
    }
    state = checkpoint_state(model)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"checkpoint {path} is not a safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} is not a prismkit checkpoint (format {meta.get('format')!r})"
        )
    return {k: json.loads(v) for k, v in meta.items() if k != "format"}


def load_checkpoint(
    path: str | Path,
    host: PluginHost | None = None,
    stage: str = "pretrain",
    overrides: list[str] | None = None,
) -> PrismerModel:
    """Rebuild the model from the stored config (with ``a.b=value`` overrides, e.g.
    ``vision.image_size=480`` to fine-tune at another resolution: the positional embedding is
    interpolated), load its pretrained sources, then the checkpoint."""
    from prismkit.core.config import apply_override

    meta = read_metadata(path)
    data = meta["config"]
    for item in overrides or []:
        apply_override(data, item, "--set")
    config = ModelConfig.from_dict(data, f"{path} (metadata)")
    model = create_model(config, host, pretrained=True)
    model.freeze(stage)
    load_weights(model, path)
    return model


def load_weights(model: PrismerModel, path: str | Path) -> None:
    """Load a checkpoint's tensors into ``model``; every stored key must fit (names and shapes),
    and every trainable weight of the model must be in the checkpoint."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {path} does not fit this model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    pos = "vision.position_embedding"
    if (
        pos in state
        and state[pos].shape != own[pos].shape
        and state[pos].shape[1:] == own[pos].shape[1:]
    ):
        # another resolution: bicubic interpolation of the grid, as the reference does when it
        # fine-tunes a 224 px checkpoint at 480 px
        from prismkit.core.vision.vit import resize_pos_embed

        state[pos] = resize_pos_embed(state[pos], model.vision.grid)
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"checkpoint {path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=False)
    model.pretrained_names |= set(state) & {n for n, _ in model.named_parameters()}
