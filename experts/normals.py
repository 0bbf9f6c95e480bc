"""Surface normals computed from the depth expert's map (weight-free)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images, require_input


def pinhole_intrinsics(
    batch: int, height: int, width: int, fov_degrees: float, device: torch.device | None = None
) -> Tensor:
    """``(B, 3, 3)`` camera matrices: horizontal field of view ``fov_degrees``, square pixels,
    principal point at the image centre."""
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    k = torch.tensor(
        [[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]],
        device=device,
    )
    return k.expand(batch, 3, 3)


class NormalsExpert(Expert):
    """Unit surface normals from depth via ``kornia.geometry.depth.depth_to_normals``.

    Reads ``inputs["depth"]`` ``(B, 1, H, W)`` (resized bilinearly if its size differs from the
    images') and returns ``(B, 3, H, W)`` float32 unit vectors in camera coordinates (kornia's
    convention: a fronto-parallel plane gets ``(0, 0, 1)``).

    Args:
        fov_degrees: horizontal field of view of the assumed pinhole camera.
        inverse_depth: the depth input is relative inverse depth (MiDaS, the default depth
            expert): it is rescaled per image to [1 / depth_range, 1] and inverted, giving
            depths in [1, depth_range]. False: the input is used as (any-scale) depth.
        depth_range: far/near ratio assumed when inverting relative inverse depth.
    """

    name: ClassVar[str] = "normal"
    kind: ClassVar[Literal["dense", "semantic"]] = "dense"
    channels: ClassVar[int] = 3
    requires: ClassVar[tuple[str, ...]] = ("depth",)

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        fov_degrees: float = 60.0,
        inverse_depth: bool = True,
        depth_range: float = 10.0,
    ) -> None:
        super().__init__(weights=weights, device=device)
        if not 0.0 < fov_degrees < 180.0:
            raise ValueError(
                f"expert {self.name!r}: fov_degrees must be in (0, 180), got {fov_degrees}"
            )
        if depth_range <= 1.0:
            raise ValueError(f"expert {self.name!r}: depth_range must be > 1, got {depth_range}")
        self.fov_degrees = fov_degrees
        self.inverse_depth = inverse_depth
        self.depth_range = depth_range

    def _to_depth(self, d: Tensor) -> Tensor:
        """``(B, 1, H, W)`` input map -> positive depth."""
        if not self.inverse_depth:
            return d
        lo = d.amin(dim=(1, 2, 3), keepdim=True)
        hi = d.amax(dim=(1, 2, 3), keepdim=True)
        unit = (d - lo) / (hi - lo).clamp_min(1e-12)
        near = 1.0 / self.depth_range
        return 1.0 / (near + (1.0 - near) * unit)

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)``, ``inputs["depth"] (B, 1, H, W)`` -> normals ``(B, 3, H, W)``."""
        from kornia.geometry.depth import depth_to_normals

        b, h, w = check_images(self.name, images)
        depth = require_input(self.name, inputs, "depth", b)
        if depth.ndim != 4 or depth.shape[1] != 1:
            raise ValueError(
                f"expert {self.name!r} expects depth of shape (B, 1, H, W); got {tuple(depth.shape)}"
            )
        if h < 2 or w < 2:
            raise ValueError(f"expert {self.name!r} needs images of at least 2x2, got {h}x{w}")
        depth = depth.to(self.device, torch.float32)
        if depth.shape[-2:] != (h, w):
            depth = F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False)
        k = pinhole_intrinsics(b, h, w, self.fov_degrees, self.device)
        normals = depth_to_normals(self._to_depth(depth), k)
        normals = F.normalize(normals.float(), dim=1)
        return self.check_output(LabelMap(normals.to(images.device)), images)


@hookimpl
def register_experts(register) -> None:
    register(NormalsExpert)
