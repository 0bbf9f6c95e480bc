"""Loading Hugging Face ``transformers`` checkpoints (hub id or local folder) for the experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prismkit.core.expert import WeightsStatus


def hf_weights_status(ref: str) -> WeightsStatus:
    """Whether ``ref`` (a local checkpoint folder or a hub id) can be loaded without a download."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return WeightsStatus(True, str(folder.resolve()))
        return WeightsStatus(
            False, f"{folder} has no config.json: save a transformers checkpoint there"
        )
    hint = (
        f"download {ref} into the Hugging Face cache (`hf download {ref}`) "
        "or pass weights=/local/folder holding its config.json, weights and preprocessor_config.json"
    )
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
    except Exception:  # not a valid repo id (e.g. a missing local path)
        return WeightsStatus(False, f"{ref!r} is neither a local folder nor a hub id in the cache")
    if isinstance(cached, str):
        return WeightsStatus(True, str(Path(cached).parent))
    return WeightsStatus(False, hint)


def load_model_and_processor(auto_model: Any, ref: str, device: torch.device) -> tuple[Any, Any]:
    """``auto_model.from_pretrained(ref)`` in eval mode on ``device``, and its image processor."""
    from transformers import AutoImageProcessor

    model = auto_model.from_pretrained(ref).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(ref)
    return model, processor


def preprocess(processor: Any, images: Tensor, device: torch.device) -> dict[str, Tensor]:
    """Run the model's image processor on ``(B, 3, H, W)`` floats in [0, 1]; tensors on ``device``."""
    batch = processor(images=list(images), return_tensors="pt", do_rescale=False)
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}


def id2label_names(config: Any) -> tuple[str, ...]:
    """The config's class names in id order (ids without a name become ``"class {i}"``)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if not id2label:
        return ()
    return tuple(id2label.get(i, f"class {i}") for i in range(max(id2label) + 1))
