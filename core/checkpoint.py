"""Checkpoints: safetensors of what the architecture's ``checkpoint_state()`` holds (trainable
weights and training state), with the resolved config and plugin versions."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prismkit.core.config import ModelConfig
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write
from prismkit.core.model import create_model

FORMAT = "prismkit-checkpoint-1"


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds: its architecture's ``checkpoint_state()``."""
    return model.checkpoint_state()


def save_checkpoint(
    model: nn.Module,
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


# fields of older checkpoints' configs that no longer exist, and why (the weights still load when
# their shapes fit the current model; a mismatch is the usual named error)
RETIRED_FIELDS = {
    "stem_channels": "expert stems follow the reference's widths per expert kind since 0.2",
}


def load_checkpoint(
    path: str | Path,
    host: PluginHost | None = None,
    stage: str = "pretrain",
    overrides: list[str] | None = None,
):
    """Rebuild the model from the stored config (with ``a.b=value`` overrides, e.g.
    ``vision.image_size=480`` to fine-tune at another resolution: the positional embedding is
    interpolated), load its pretrained sources, then the checkpoint."""
    from prismkit.core.config import apply_override
    from prismkit.core.preflight import require_weights

    meta = read_metadata(path)
    data = meta["config"]
    for old, why in RETIRED_FIELDS.items():
        if old in data:
            warnings.warn(f"{path}: config field {old!r} dropped ({why})", stacklevel=2)
            del data[old]
    for item in overrides or []:
        apply_override(data, item, "--set")
    config = ModelConfig.from_dict(data, f"{path} (metadata)")
    host = host or get_plugin_manager()
    require_weights(config, host, experts=False)
    model = create_model(config, host, pretrained=True)
    model.freeze(stage)
    load_weights(model, path)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's tensors into ``model``; every stored key must fit (names and shapes),
    and everything the model's ``checkpoint_state()`` holds (trainable weights, training state)
    must be in the checkpoint."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(model.checkpoint_state()) - set(state))
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
    if hasattr(model, "pretrained_names"):  # the weights new_lr must not treat as new
        model.pretrained_names |= set(state) & {n for n, _ in model.named_parameters()}
