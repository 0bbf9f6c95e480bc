"""The experts on Hugging Face ``transformers`` checkpoints (hub id or local folder): one base class
and one loader, so every such expert reports weights and loading failures in the same words.

A new one is a few lines: subclass :class:`HFExpert`, set ``name``, ``kind``, ``channels``,
``default_weights`` and ``auto_model`` (a ``transformers`` auto class name), and write ``predict``
with ``self.model_inputs(images)`` and ``self.model`` / ``self.processor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from prismkit.core.expert import Expert, WeightsStatus


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


def _is_local(ref: str) -> bool:
    """``ref`` names a path (it exists, or is spelled like one), not a hub id."""
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~"))


def load_model_and_processor(
    expert: str, auto_model: str, ref: str, device: torch.device
) -> tuple[Any, Any]:
    """``transformers.<auto_model>.from_pretrained(ref)`` (eval mode, frozen, on ``device``) and
    its ``AutoImageProcessor``.

    A local path without a checkpoint fails before ``transformers`` is asked, with the words of
    :func:`hf_weights_status`; a hub id not in the cache is handed to ``from_pretrained`` (which
    downloads it when the network allows). Any failure is one line naming ``expert`` and ``ref``:
    ``FileNotFoundError`` for missing or unreadable files, ``ValueError`` for a checkpoint
    ``transformers`` rejects.
    """
    import transformers

    status = hf_weights_status(ref)
    if not status.available and _is_local(ref):
        raise FileNotFoundError(f"expert {expert!r} has no weights here: {status.where}")
    try:
        model = getattr(transformers, auto_model).from_pretrained(ref)
        processor = transformers.AutoImageProcessor.from_pretrained(ref)
    except OSError as e:
        where = status.where if not status.available else ref
        raise FileNotFoundError(
            f"expert {expert!r} cannot load its weights ({where}): {_first_line(e)}"
        ) from e
    except ValueError as e:
        raise ValueError(f"expert {expert!r} cannot load {ref}: {_first_line(e)}") from e
    return model.to(device).eval().requires_grad_(False), processor


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


class HFExpert(Expert):
    """An expert on a ``transformers`` checkpoint, loaded lazily by :func:`load_model_and_processor`.

    ``weights``: a hub id or a local checkpoint folder (config, weights, preprocessor config);
    default ``default_weights``. Subclasses set ``auto_model`` and may override ``_after_load`` to
    read the loaded config (class names, say).
    """

    # hub id used when no ``weights`` are given
    default_weights: ClassVar[str]
    # the transformers auto class that loads the model, e.g. "AutoModelForDepthEstimation"
    auto_model: ClassVar[str]

    def __init__(self, *, weights: str | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        self._model: Any = None
        self._processor: Any = None

    @property
    def ref(self) -> str:
        """The hub id or folder the weights load from."""
        return self.weights or self.default_weights

    @property
    def model(self) -> Any:
        """The loaded ``transformers`` model (loads it on first use)."""
        self.load()
        return self._model

    @property
    def processor(self) -> Any:
        """The loaded image processor (loads it on first use)."""
        self.load()
        return self._processor

    def weights_status(self) -> WeightsStatus:
        return hf_weights_status(self.ref)

    def load(self) -> None:
        if self._model is not None:
            return
        self._model, self._processor = load_model_and_processor(
            self.name, self.auto_model, self.ref, self.device
        )
        try:
            self._after_load()
        except BaseException:
            self._model = self._processor = None  # a rejected checkpoint is not kept half-loaded
            raise

    def _after_load(self) -> None:  # noqa: B027 - optional hook
        """Called once after loading: read what the config says (class names, say)."""

    def model_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """``(B, 3, H, W)`` in [0, 1] -> the processor's tensors on ``self.device``."""
        return preprocess(self.processor, images.to(self.device), self.device)
