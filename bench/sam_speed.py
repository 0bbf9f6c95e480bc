"""Speed of the ``seg_sam`` expert per image with random weights, and its gallery column.

No official SAM weights are needed: a SAM of the chosen size is built from segment-anything's
modules with random weights (seed 0), saved as a state-dict ``.pth`` (as the official files are)
and loaded through the expert's own checkpoint path. Random weights give arbitrary masks and
fail the reference quality filters (predicted IoU 0.88, stability 0.95), so the time is
measured twice: with the reference filters (nearly every mask dropped early: little
post-processing) and with the filters off (every mask goes through NMS, RLE and painting). A
trained model keeps some of its masks, so its time lies between the two. The tagger's time (CAM)
is not included::

    python -m prismkit.bench.sam_speed                       # vit_b, one 512x512 photo
    python -m prismkit.bench.sam_speed --gallery sam.png --skip-speed   # the gallery only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prismkit.core.expert import LabelMap
from prismkit.experts._common import to_uint8_hwc
from prismkit.experts.cam import CAMTags
from prismkit.experts.sam import SAM_ARCHS, TINY_SAM_ARCH, SamArch, SamSegmentation, build_sam

FILTERS_OFF = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def save_random_sam(arch: SamArch, path: Path, seed: int = 0) -> Path:
    """A random SAM of ``arch`` saved as a plain state dict (``torch.save``), as SAM ships."""
    torch.manual_seed(seed)
    torch.save(build_sam(arch).state_dict(), path)
    return path


PHOTOS = ("astronaut", "coffee", "chelsea")  # skimage.data photos


def photo(name: str, size: int) -> Tensor:
    """A skimage photo resized to ``size x size``: ``(1, 3, size, size)`` in [0, 1]."""
    from skimage import data

    from prismkit.core.processor import load_image
    from prismkit.labels.runner import resize_square

    return resize_square(load_image(getattr(data, name)()), size)[None]


def time_expert(
    expert: SamSegmentation, images: Tensor, tags: LabelMap, repeats: int, warmup: int
) -> dict[str, Any]:
    """Load time, then ``warmup`` untimed and ``repeats`` timed ``predict`` calls on one image;
    the image encoder's share is timed apart (``SamPredictor.set_image``). Wall-clock seconds,
    and this process's CPU seconds (``time.process_time``): on one thread, on a CPU shared with
    other jobs, the CPU seconds are close to what the wall clock would read on an idle core."""
    t0 = time.perf_counter()
    expert.load()
    load_s = time.perf_counter() - t0
    for _ in range(warmup):
        expert.predict(images, {expert.requires[0]: tags})
    totals, encoder, cpu_totals, cpu_encoder = [], [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = expert.predict(images, {expert.requires[0]: tags})
        totals.append(time.perf_counter() - t0)
        cpu_totals.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            expert.generator.predictor.set_image(to_uint8_hwc(images[0]).copy())
        encoder.append(time.perf_counter() - t0)
        cpu_encoder.append(time.process_time() - c0)
    return {
        "load_s": round(load_s, 3),
        "s_per_image": round(statistics.median(totals), 3),
        "all_s": [round(t, 3) for t in totals],
        "encoder_s": round(statistics.median(encoder), 3),
        "cpu_s_per_image": round(statistics.median(cpu_totals), 3),
        "cpu_encoder_s": round(statistics.median(cpu_encoder), 3),
        "masks_painted": len(out.names[0]) - 1 if out.names else 0,
    }


def measure(
    model_type: str,
    size: int,
    repeats: int,
    warmup: int,
    points_per_side: int,
    filters: str = "both",
) -> dict[str, Any]:
    """``seg_sam`` at ``model_type`` size with random weights on one ``size``-px photo."""
    images = photo("astronaut", size)
    tags = CAMTags().predict(images, {})
    result: dict[str, Any] = {
        "model_type": model_type,
        "weights": "random (seed 0), saved and loaded through the expert's checkpoint path",
        "image": f"skimage astronaut, {size}x{size}",
        "points_per_side": points_per_side,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "loadavg_1m_before": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_sam(SAM_ARCHS[model_type], Path(tmp) / f"random_sam_{model_type}.pth")
        cases = {"reference": ("reference filters", {}), "off": ("filters off", FILTERS_OFF)}
        for key, (label, extra) in cases.items():
            if filters not in ("both", key):
                continue
            expert = SamSegmentation(
                weights=str(path), model_type=model_type, points_per_side=points_per_side, **extra
            )
            result[label] = time_expert(expert, images, tags, repeats, warmup)
            print(f"{label}: {result[label]}", flush=True)
            del expert
    result["loadavg_1m_after"] = os.getloadavg()[0]
    return result


def gallery(out: Path, size: int, colors: int | None = None) -> None:
    """skimage's astronaut, coffee and chelsea beside ``seg_sam`` (tiny random SAM, filters off)
    and its CAM tagger, drawn by ``prismkit experts show``'s renderer; ``colors``: rewrite the
    PNG with a palette of that many colours (a smaller file)."""
    from PIL import Image

    from prismkit.labels.gallery import render_gallery

    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for name in PHOTOS:
            images.append(Path(tmp) / f"{name}.png")
            pixels = (photo(name, size)[0].permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(images[-1])
        weights = save_random_sam(TINY_SAM_ARCH, Path(tmp) / "tiny_sam.pth")
        experts = {
            "seg_sam": SamSegmentation(
                weights=str(weights), model_type=TINY_SAM_ARCH, **FILTERS_OFF
            ),
            "obj_tags_cam": CAMTags(),
        }
        render_gallery(images, experts, out)
    if colors is not None:
        rgb = Image.open(out).convert("RGB")
        small = rgb.quantize(colors, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        tmp_png = out.with_name(f".{out.name}.tmp.png")
        small.save(tmp_png, optimize=True)
        os.replace(tmp_png, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-type", default="vit_b", choices=sorted(SAM_ARCHS))
    p.add_argument("--size", type=int, default=512, help="photo side in pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); on a CPU shared with other jobs, 1 thread "
        "avoids the OpenMP barrier stalls of the mask generator's many small operations",
    )
    p.add_argument(
        "--filters",
        choices=["reference", "off", "both"],
        default="both",
        help="time with the reference quality filters, with them off, or both",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--gallery", type=Path, default=None, help="write the gallery PNG here")
    p.add_argument("--gallery-colors", type=int, default=None, help="palette PNG of N colours")
    p.add_argument("--skip-speed", action="store_true", help="only the gallery")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for path in (args.out, args.gallery):
        if path is not None and path.exists():
            print(f"sam_speed: error: {path} exists; pass another path", file=sys.stderr)
            return 2
    if args.gallery is not None:
        gallery(args.gallery, 256, args.gallery_colors)
        print(f"wrote {args.gallery}")
    if args.skip_speed:
        return 0
    result = measure(args.model_type, args.size, args.repeats, args.warmup, args.points_per_side)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
