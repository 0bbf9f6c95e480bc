"""Input checks and small helpers shared by the built-in experts."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from prismkit.core.expert import LabelMap


def check_images(name: str, images: Tensor) -> tuple[int, int, int]:
    """Raise a ``ValueError`` naming expert ``name`` unless ``images`` is ``(B, 3, H, W)`` float.

    Returns ``(B, H, W)``.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"expert {name!r} expects a torch.Tensor of images, got {type(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expert {name!r} expects RGB images of shape (B, 3, H, W); got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"expert {name!r} expects float images in [0, 1]; got dtype {images.dtype}"
        )
    b, _, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"expert {name!r} got an empty batch {tuple(images.shape)}")
    return b, h, w


def require_input(name: str, inputs: dict[str, LabelMap], key: str, batch: int) -> Tensor:
    """The ``values`` of the label map ``inputs[key]``; a ``ValueError`` naming ``name`` if absent
    or of another batch size."""
    if key not in inputs:
        raise ValueError(
            f"expert {name!r} requires the labels of expert {key!r} in `inputs`; got {sorted(inputs)}"
        )
    values = inputs[key].values
    if values.shape[0] != batch:
        raise ValueError(
            f"expert {name!r}: inputs[{key!r}] has batch {values.shape[0]}, images have {batch}"
        )
    return values


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 numpy array (RGB)."""
    return (
        (image.detach().float().clamp(0, 1) * 255).round().to("cpu").byte().permute(1, 2, 0).numpy()
    )
