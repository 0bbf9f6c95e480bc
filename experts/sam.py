"""Segment-anything masks named by a tagger expert: a semantic map like the other segmenters.

SAM (Kirillov et al. 2023) gives class-agnostic masks; ``segment_anything``'s own
``SamAutomaticMaskGenerator`` prompts it with a grid of points and filters, de-duplicates and
returns the masks. Each mask is then named by majority vote of a tagger expert's labels inside
it (the voting of Semantic Segment Anything, Chen et al. 2023), and the named masks are painted
largest first, as the detection expert paints boxes.

Weights are SAM's official checkpoints: plain ``state_dict`` ``.pth`` files, read with
``torch.load(weights_only=True)`` into the architecture ``model_type`` names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core.expert import Expert, LabelMap, WeightsStatus
from prismkit.core.hookspecs import hookimpl
from prismkit.experts._common import check_images, require_input, to_uint8_hwc

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# the official checkpoint file of each model type (segment-anything's README), largest first
OFFICIAL_FILES: dict[str, str] = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
# SAM normalises 0-255 RGB with ImageNet's mean and std
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch:
    """A SAM architecture: what ``segment_anything.build_sam._build_sam`` takes or fixes.

    The defaults are the values the official builder fixes for every model type.
    """

    # image encoder (ViT) width, depth and heads
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    # encoder blocks with global attention (the others attend in windows)
    encoder_global_attn_indexes: tuple[int, ...]
    # square input side the longest image side is resized to, and the ViT patch size
    image_size: int = 1024
    patch_size: int = 16
    # side of the encoder's attention windows, in patches
    window_size: int = 14
    # width of the image embedding, the prompt encoder and the mask decoder
    prompt_embed_dim: int = 256
    # hidden channels of the prompt encoder's mask-input downscaler
    mask_in_chans: int = 16
    # mask decoder's two-way transformer
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    # mask decoder's IoU-prediction MLP
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


# the official model types (segment_anything.build_sam); "default" there is vit_h
SAM_ARCHS: dict[str, SamArch] = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
}

# a tiny SAM for tests and demos with random weights (as timm's test_vit): a 64-px input, 8-px
# patches, two 32-wide encoder blocks (one windowed, one global), a 32-wide decoder; ~86k
# parameters. Not an official model type: no checkpoint exists for it.
TINY_SAM_ARCH = SamArch(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=64,
    patch_size=8,
    window_size=4,
    prompt_embed_dim=32,
    mask_in_chans=4,
    decoder_depth=2,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_depth=3,
    iou_head_hidden_dim=32,
)


def build_sam(arch: SamArch) -> nn.Module:
    """A ``segment_anything.modeling.Sam`` of ``arch``, built from segment-anything's own modules
    exactly as its ``_build_sam`` does (random weights, eval mode)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A checkpoint file's tensors: ``.safetensors``, or a ``torch.save``d state dict read with
    ``weights_only=True`` (SAM's official ``.pth`` files are plain state dicts). One-line
    ``ValueError`` naming the file when it is neither."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} cannot be read as a state dict with torch.load(weights_only=True): {reason}"
        ) from e
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()
    ):
        raise ValueError(
            f"{path} is not a SAM checkpoint: expected a state dict (parameter name -> tensor), "
            f"got {type(raw).__name__}"
        )
    return dict(raw)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """None when ``state`` fits ``model`` exactly (same keys and shapes); else a short account:
    counts of missing, unexpected and wrongly shaped tensors, with the first of each."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    parts = [
        f"{len(items)} {what} (first: {items[0]})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    return "; ".join(parts) or None


def load_sam(path: Path, arch: SamArch, label: str) -> nn.Module:
    """SAM of ``arch`` with the weights of ``path``, strictly: every tensor present, none extra,
    every shape right (else a one-line ``ValueError`` naming the file and ``label``, the model
    type). Built on the meta device and filled with the file's tensors, so peak memory is one
    copy of the weights."""
    state = read_state_dict(path)
    with torch.device("meta"):
        sam = build_sam(arch)
    mismatch = state_dict_mismatch(sam, state)
    if mismatch:
        raise ValueError(
            f"{path} does not fit SAM model type {label}: {mismatch}; pass the model_type the "
            f"checkpoint was made for ({', '.join(SAM_ARCHS)})"
        )
    # fp32 like the official files (a half-precision copy would run slowly or not at all on CPU)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    sam.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers are not in the file: build_sam makes pixel_mean/std on the CPU
    left = [n for n, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"SAM from {path}: tensors {left} were not filled")
    return sam.eval().requires_grad_(False)


def name_masks(masks: Tensor, tags: Tensor, tag_names: Sequence[str]) -> list[str | None]:
    """Name each mask by majority vote of a tagger's labels inside it.

    Args:
        masks: ``(N, H, W)`` bool.
        tags: ``(H, W)`` int64 indices into ``tag_names`` (0 = background).
        tag_names: the tagger's names for this image; indices that share a name (two "person"
            instances) vote together, and an index named like index 0 counts as background.

    Returns: per mask, the name with the most pixels inside it (ties: the name the tagger lists
    first), or None when background wins (or the mask is empty).
    """
    if len(masks) == 0:
        return []
    unique = list(dict.fromkeys(tag_names))  # names in the tagger's order; background first
    group = torch.tensor([unique.index(n) for n in tag_names], dtype=torch.long)
    pixels = group[tags.long().cpu()].flatten()  # (H*W,) name ids
    out: list[str | None] = []
    for m in masks.cpu().flatten(1):
        votes = torch.bincount(pixels[m], minlength=len(unique))
        best = int(votes.argmax())  # the first maximum: ties go to the earlier name
        out.append(None if best == 0 or int(votes[best]) == 0 else unique[best])
    return out


def paint_masks(masks: Tensor) -> tuple[Tensor, list[int]]:
    """Paint ``(N, H, W)`` bool masks into an ``(H, W)`` int64 map, largest mask first so smaller
    ones stay on top (as ``paint_boxes``). Returns the map (mask ``order[i]`` has index ``i + 1``,
    0 = no mask) and ``order``."""
    out = torch.zeros(masks.shape[-2:], dtype=torch.int64)
    if len(masks) == 0:
        return out, []
    area = masks.flatten(1).sum(1).tolist()
    order = sorted(range(len(masks)), key=lambda i: (-area[i], i))
    for index, i in enumerate(order, start=1):
        out[masks[i].cpu()] = index
    return out, order


class SamSegmentation(Expert):
    """Class-agnostic SAM masks (``SamAutomaticMaskGenerator``) named by a tagger expert.

    The tagger is the expert in ``requires`` (``obj_tags_cam``: ImageNet tags from
    class-activation maps, offline). To name masks with another semantic expert (detection, a
    CLIP-style tagger), subclass with another ``name`` and ``requires = ("obj_detection",)``.
    Each mask takes the tagger's name with the most pixels inside it (:func:`name_masks`); masks
    where background wins are dropped; the rest are painted largest first (:func:`paint_masks`).

    Output: ``(B, H, W)`` int64 instance ids (0 = background);
    ``names[b] == ["background", name of mask 1, name of mask 2, ...]``.

    Args:
        weights: a SAM checkpoint file (``.pth`` state dict or ``.safetensors``). None: the
            official file of ``model_type`` in ``cache_dir``.
        model_type: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` or a :class:`SamArch`. None: the type
            in the official file name (``sam_vit_b_01ec64.pth`` is vit_b); without ``weights``,
            the largest official file found in ``cache_dir``.
        cache_dir: where official files are looked for; default torch hub's checkpoint folder
            (``$TORCH_HOME/hub/checkpoints``, where ``torch.hub.load_state_dict_from_url`` puts
            them).
        points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
        stability_score_offset, box_nms_thresh, crop_n_layers, crop_nms_thresh,
        crop_overlap_ratio, crop_n_points_downscale_factor, min_mask_region_area:
            ``SamAutomaticMaskGenerator``'s options, with its defaults (tuned for ViT-H).
            ``points_per_side`` costs quadratically: 32 prompts 1024 points per image.
    """

    name: ClassVar[str] = "seg_sam"
    kind: ClassVar[Literal["dense", "semantic"]] = "semantic"
    channels: ClassVar[int] = 64
    requires: ClassVar[tuple[str, ...]] = ("obj_tags_cam",)

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        model_type: str | SamArch | None = None,
        cache_dir: str | None = None,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
    ) -> None:
        super().__init__(weights=weights, device=device)
        if isinstance(model_type, str) and model_type not in SAM_ARCHS:
            raise ValueError(
                f"expert {self.name!r}: model_type must be one of {', '.join(SAM_ARCHS)} or a "
                f"SamArch, got {model_type!r}"
            )
        if len(self.requires) != 1:
            raise ValueError(
                f"expert {self.name!r}: requires must name exactly one tagger expert, "
                f"got {self.requires}"
            )
        checks = {
            "points_per_side": points_per_side >= 1,
            "points_per_batch": points_per_batch >= 1,
            "pred_iou_thresh": 0.0 <= pred_iou_thresh <= 1.0,
            "stability_score_thresh": 0.0 <= stability_score_thresh <= 1.0,
            "box_nms_thresh": 0.0 <= box_nms_thresh <= 1.0,
            "crop_n_layers": crop_n_layers >= 0,
            "crop_nms_thresh": 0.0 <= crop_nms_thresh <= 1.0,
            "crop_overlap_ratio": 0.0 <= crop_overlap_ratio < 1.0,
            "crop_n_points_downscale_factor": crop_n_points_downscale_factor >= 1,
            "min_mask_region_area": min_mask_region_area >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"expert {self.name!r}: {bad[0]} out of range (counts >= 1, thresholds in [0, 1], "
                "crop_n_layers and min_mask_region_area >= 0)"
            )
        self.model_type = model_type
        self.cache_dir = cache_dir
        self.generator_options: dict[str, Any] = {
            "points_per_side": points_per_side,
            "points_per_batch": points_per_batch,
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "stability_score_offset": stability_score_offset,
            "box_nms_thresh": box_nms_thresh,
            "crop_n_layers": crop_n_layers,
            "crop_nms_thresh": crop_nms_thresh,
            "crop_overlap_ratio": crop_overlap_ratio,
            "crop_n_points_downscale_factor": crop_n_points_downscale_factor,
            "min_mask_region_area": min_mask_region_area,
        }
        self._sam: nn.Module | None = None
        self._generator: Any = None

    # ------------------------------------------------------------------ weights

    def checkpoint_dir(self) -> Path:
        """Where official checkpoint files are looked for."""
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return Path(torch.hub.get_dir()) / "checkpoints"

    def _missing_hint(self, types: Sequence[str]) -> str:
        files = " or ".join(f"{OFFICIAL_FILES[t]} ({t})" for t in types)
        return (
            f"put {files} from {SAM_URL} into {self.checkpoint_dir()}/, or pass "
            "weights=FILE (a SAM .pth state dict) and model_type"
        )

    def resolve(self) -> tuple[Path, SamArch, str]:
        """The checkpoint file, its architecture and a label for messages.

        Raises ``FileNotFoundError`` (no file) or ``ValueError`` (the model type cannot be
        told), with the words ``weights_status`` reports.
        """
        arch_given = self.model_type if isinstance(self.model_type, SamArch) else None
        if self.weights is not None:
            path = Path(self.weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"SAM checkpoint {path} does not exist: pass weights=FILE of a SAM "
                    f"checkpoint, e.g. {OFFICIAL_FILES['vit_b']} from {SAM_URL}"
                )
            if arch_given is not None:
                return path, arch_given, "custom SamArch"
            if isinstance(self.model_type, str):
                return path, SAM_ARCHS[self.model_type], self.model_type
            found = re.match(r"sam_(vit_[bhl])[_.]", path.name)
            if found is None:
                raise ValueError(
                    f"the SAM model type of {path} cannot be told from its name: pass "
                    f"model_type ({', '.join(SAM_ARCHS)})"
                )
            return path, SAM_ARCHS[found.group(1)], found.group(1)
        if arch_given is not None:
            raise FileNotFoundError("a custom SamArch has no official file: pass weights=FILE")
        folder = self.checkpoint_dir()
        types = [self.model_type] if isinstance(self.model_type, str) else list(OFFICIAL_FILES)
        for t in types:
            if (folder / OFFICIAL_FILES[t]).is_file():
                return folder / OFFICIAL_FILES[t], SAM_ARCHS[t], t
        raise FileNotFoundError(self._missing_hint(types))

    def weights_status(self) -> WeightsStatus:
        try:
            path, _, label = self.resolve()
        except (FileNotFoundError, ValueError) as e:
            return WeightsStatus(False, str(e))
        return WeightsStatus(True, f"{path} ({label})")

    def load(self) -> None:
        if self._sam is not None:
            return
        from segment_anything import SamAutomaticMaskGenerator

        try:
            path, arch, label = self.resolve()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"expert {self.name!r} has no weights here: {e}") from None
        except ValueError as e:
            raise ValueError(f"expert {self.name!r}: {e}") from None
        try:
            sam = load_sam(path, arch, label).to(self.device)
        except ValueError as e:
            raise ValueError(f"expert {self.name!r}: {e}") from None
        self._generator = SamAutomaticMaskGenerator(sam, **self.generator_options)
        self._sam = sam

    @property
    def generator(self) -> Any:
        """The loaded ``segment_anything.SamAutomaticMaskGenerator`` (loads on first use)."""
        self.load()
        return self._generator

    # ------------------------------------------------------------------ prediction

    def masks(self, image: Tensor) -> Tensor:
        """SAM's masks of one ``(3, H, W)`` image in [0, 1]: ``(N, H, W)`` bool, in the mask
        generator's order."""
        records = self.generator.generate(np.ascontiguousarray(to_uint8_hwc(image)))
        if not records:
            return torch.zeros(0, *image.shape[-2:], dtype=torch.bool)
        return torch.from_numpy(np.stack([r["segmentation"] for r in records])).bool()

    def _tagger_labels(self, inputs: dict[str, LabelMap], b: int, h: int, w: int) -> LabelMap:
        """The tagger's ``(B, H, W)`` indices (resized nearest when its size differs) and names."""
        tagger = self.requires[0]
        values = require_input(self.name, inputs, tagger, b)
        names = inputs[tagger].names
        if names is None or values.ndim != 3 or values.is_floating_point():
            raise ValueError(
                f"expert {self.name!r} names masks with a semantic expert's labels "
                f"((B, H, W) indices + names); inputs[{tagger!r}] is {tuple(values.shape)} "
                f"{values.dtype}{'' if names is not None else ' without names'}"
            )
        if values.shape[-2:] != (h, w):
            values = F.interpolate(values[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        return LabelMap(values.long().cpu(), names)

    @torch.inference_mode()
    def predict(self, images: Tensor, inputs: dict[str, LabelMap]) -> LabelMap:
        """``images (B, 3, H, W)`` in [0, 1] + the tagger's labels -> instance ids
        ``(B, H, W)`` int64 (0 = background) and per-image names."""
        b, h, w = check_images(self.name, images)
        tags = self._tagger_labels(inputs, b, h, w)
        assert tags.names is not None
        maps, names = [], []
        for i in range(b):
            masks = self.masks(images[i])
            mask_names = name_masks(masks, tags.values[i], tags.names[i])
            keep = [j for j, n in enumerate(mask_names) if n is not None]
            painted, order = paint_masks(masks[keep])
            maps.append(painted)
            names.append(["background", *(str(mask_names[keep[j]]) for j in order)])
        values = torch.stack(maps).to(images.device)
        return self.check_output(LabelMap(values, names), images)


@hookimpl
def register_experts(register) -> None:
    register(SamSegmentation)
