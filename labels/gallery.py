"""A picture of what the experts see: each image beside every expert's map, in one PNG.

How maps are drawn (read from the data and the expert's contract, never from its name):

- dense, 3 channels (normals): as RGB, ``(n + 1) / 2`` when values lie in [-1, 1], else min-max;
- dense, 1 channel: a matplotlib colormap: the expert's ``gallery_cmap`` attribute when it has
  one, else ``"gray"`` for sparse maps (more than half the pixels exactly 0: edges) and
  ``"magma"`` otherwise (depth); other channel counts show the per-pixel L2 norm;
- semantic maps with background pixels (index 0: detection, OCR instances): the dimmed image
  with each instance tinted, its bounding box outlined and its name (class or recognised text)
  written on the box;
- semantic maps without background (segmentation, superpixels): regions coloured by name over
  the image, region boundaries in white, names written at the regions' centres (the
  ``max_names`` largest regions).

Cells where an expert failed (or, with a store, has no labels) show the error in red.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.io import atomic_write
from prismkit.labels.runner import dependency_order, resize_square
from prismkit.labels.store import LabelStore

CELL_INCHES = 3.0


def _dense_rgb(values: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` -> ``(H, W, 3)`` in [0, 1]."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= -1.0001 and hi <= 1.0001 and lo < 0:
        rgb = (values + 1) / 2
    else:
        rgb = (values - lo) / max(hi - lo, 1e-12)
    return np.clip(rgb.transpose(1, 2, 0), 0, 1)


def _palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours ``(n, 3)`` (tab20, then hsv beyond 20)."""
    from matplotlib import colormaps

    if n <= 20:
        return np.asarray(colormaps["tab20"](np.arange(n) % 20))[:, :3]
    return np.asarray(colormaps["hsv"](np.linspace(0, 1, n, endpoint=False)))[:, :3]


def _anchor(mask: np.ndarray) -> tuple[float, float]:
    """A point inside ``mask`` near its centroid: ``(x, y)``."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return float(xs[i]), float(ys[i])


def _draw_semantic(ax, image: np.ndarray, index: np.ndarray, names: list[str], max_names: int):
    from matplotlib.patches import Rectangle
    from skimage.segmentation import find_boundaries

    present = [int(k) for k in np.unique(index)]
    areas = {k: int((index == k).sum()) for k in present}
    if 0 in present:  # instances on background: tinted, boxes outlined, text on the box
        instances = sorted((k for k in present if k != 0), key=lambda k: -areas[k])
        colours = _palette(max(len(instances), 1))
        shown = image * 0.45 + 0.2
        for colour, k in zip(colours, instances, strict=False):
            mask = index == k
            shown[mask] = shown[mask] * 0.6 + colour * 0.4
        ax.imshow(np.clip(shown, 0, 1))
        for colour, k in zip(colours, instances[:max_names], strict=False):
            ys, xs = np.nonzero(index == k)
            x0, y0, x1, y1 = xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5
            ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5)
            )
            ax.text(
                x0,
                y0,
                names[k],
                fontsize=6,
                color="black",
                va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0},
            )
        return
    distinct = list(dict.fromkeys(names[k] for k in present))
    colours = dict(zip(distinct, _palette(len(distinct)), strict=True))
    lut = np.zeros((len(names), 3))
    for k in present:
        lut[k] = colours[names[k]]
    overlay = image * 0.4 + lut[index] * 0.6
    overlay[find_boundaries(index, mode="inner")] = 1.0
    ax.imshow(np.clip(overlay, 0, 1))
    for k in sorted(present, key=lambda k: -areas[k])[:max_names]:
        x, y = _anchor(index == k)
        ax.text(
            x,
            y,
            names[k],
            fontsize=5,
            ha="center",
            va="center",
            bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.5, "linewidth": 0},
        )


def _draw(ax, expert: Expert, image: np.ndarray, labels: LabelMap, max_names: int) -> None:
    values = labels.values[0].detach().float().cpu().numpy()
    if expert.kind == "semantic":
        _draw_semantic(ax, image, values.astype(np.int64), list(labels.names[0]), max_names)  # type: ignore[index]
        return
    if values.shape[0] == 3:
        ax.imshow(_dense_rgb(values))
        return
    plane = values[0] if values.shape[0] == 1 else np.linalg.norm(values, axis=0)
    cmap = getattr(expert, "gallery_cmap", None) or (
        "gray" if float((plane == 0).mean()) > 0.5 else "magma"
    )
    ax.imshow(plane, cmap=cmap)


def _labels_for(
    image: Tensor, path: Path, experts: dict[str, Expert], store: LabelStore | None
) -> dict[str, LabelMap | str]:
    """Each expert's labels for one image, or the error message of its failure."""
    out: dict[str, LabelMap | str] = {}
    batch = image[None]
    for name in dependency_order(experts):
        e = experts[name]
        try:
            if store is not None:
                out[name] = store.get(path, e)
                continue
            inputs = {}
            for r in e.requires:
                got = out[r]
                if isinstance(got, str):
                    raise ValueError(f"it requires {r!r}, which failed")
                inputs[r] = LabelMap(got.values.to(e.device), got.names)
            x = batch.to(e.device)
            with torch.inference_mode():
                res = e.check_output(e.predict(x, inputs), x)
            out[name] = LabelMap(res.values.cpu(), res.names)
        except Exception as err:
            out[name] = f"expert {name!r} failed on image {path}: {type(err).__name__}: {err}"
    return out


def _error_cell(ax, message: str) -> None:
    ax.text(
        0.5,
        0.5,
        textwrap.fill(message, 44),
        color="red",
        fontsize=5,
        ha="center",
        va="center",
        transform=ax.transAxes,
        clip_on=True,
    )


def render_gallery(
    image_paths: Sequence[str | Path],
    experts: dict[str, Expert],
    out_png: str | Path,
    *,
    store: LabelStore | None = None,
    size: int | None = None,
    max_names: int = 24,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Draw a grid (one row per image: the image, then each expert's map) to ``out_png``.

    Args:
        experts: name -> expert; labels are computed on the fly (dependencies first) unless
            ``store`` is given, in which case they are read from it (``store.size`` applies).
        size: resize images to ``size x size`` before labelling (ignored with a store).
        max_names: at most this many names (largest regions / instances) written per map.

    Returns the failure messages (also drawn in their cells and passed to ``log``).
    """
    from matplotlib.figure import Figure

    from prismkit.core.processor import load_image

    if not image_paths:
        raise ValueError("render_gallery needs at least one image")
    names = list(experts)
    rows, cols = len(image_paths), 1 + len(names)
    fig = Figure(figsize=(CELL_INCHES * cols, CELL_INCHES * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    failures: list[str] = []
    for r, p in enumerate(image_paths):
        path = Path(p)
        try:
            image = load_image(path)
        except (ValueError, TypeError) as err:  # this row shows the error; the others are drawn
            msg = str(err) if str(path) in str(err) else f"image {path}: {err}"
            failures.append(msg)
            log(msg)
            axes[r, 0].set_title(path.name, fontsize=8)
            _error_cell(axes[r, 0], msg)
            continue
        resize = store.size if store is not None else size
        if resize is not None:
            image = resize_square(image, resize)
        rgb = image.permute(1, 2, 0).numpy()
        labels = _labels_for(image, path, experts, store)
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_title(path.name, fontsize=8)
        for c, name in enumerate(names, start=1):
            ax = axes[r, c]
            got = labels[name]
            if isinstance(got, str):
                failures.append(got)
                log(got)
                _error_cell(ax, got)
            else:
                _draw(ax, experts[name], rgb, got, max_names)
    for c, name in enumerate(names, start=1):
        e = experts[name]
        axes[0, c].set_title(f"{name} ({e.kind}, v{e.version})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    return failures
