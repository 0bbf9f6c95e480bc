"""The expert gallery: a grid PNG of real images beside real and fake expert maps, from live
experts or a label store, failures drawn in their cells, and ``prismkit experts show``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import easy_vqa  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from prismkit.core.cli import build_parser  # noqa: E402
from prismkit.core.expert import Expert, LabelMap  # noqa: E402
from prismkit.core.host import get_plugin_manager  # noqa: E402
from prismkit.experts.edges import CannyEdges  # noqa: E402
from prismkit.experts.segmentation import SuperpixelSegmentation  # noqa: E402
from prismkit.labels.gallery import CELL_INCHES, render_gallery  # noqa: E402
from prismkit.labels.runner import run_experts  # noqa: E402
from prismkit.labels.store import LabelStore  # noqa: E402


class FakeNormals(Expert):
    """Dense, 3 channels in [-1, 1]: unit vectors from the image gradients."""

    name = "fake_normals"
    kind = "dense"
    channels = 3

    def predict(self, images, inputs):
        g = images.mean(1, keepdim=True)
        dx = F.pad(g[..., :, 1:] - g[..., :, :-1], (0, 1))
        dy = F.pad(g[..., 1:, :] - g[..., :-1, :], (0, 0, 0, 1))
        return LabelMap(F.normalize(torch.cat([-dx, -dy, torch.full_like(g, 0.1)], 1), dim=1))


class FakeDetection(Expert):
    """Semantic instances on background: two boxes named like detections / OCR words."""

    name = "fake_detection"
    kind = "semantic"
    channels = 64

    def predict(self, images, inputs):
        b, _, h, w = images.shape
        idx = torch.zeros(b, h, w, dtype=torch.long)
        idx[:, h // 8 : h // 2, w // 8 : w // 2] = 1
        idx[:, h // 2 : h - 2, w // 2 : w - 2] = 2
        return LabelMap(idx, [["background", "person", "STOP"]] * b)


class Broken(Expert):
    name = "broken"
    kind = "dense"
    channels = 1

    def predict(self, images, inputs):
        raise RuntimeError("weights are corrupt")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("gallery_images")
    astronaut = root / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((96, 96)).save(astronaut)
    return [astronaut, Path(sorted(easy_vqa.get_train_image_paths().values())[0])]


def _experts() -> dict[str, Expert]:
    return {
        "edge": CannyEdges(),
        "seg_superpixel": SuperpixelSegmentation(n_segments=6),
        "fake_normals": FakeNormals(),
        "fake_detection": FakeDetection(),
    }


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_gallery_grid(images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "gallery.png"
    messages: list[str] = []
    failures = render_gallery(images, _experts(), out, size=64, log=messages.append)
    assert failures == [] and messages == []
    px = _pixels(out)
    assert px.shape == (int(CELL_INCHES * 100) * 2, int(CELL_INCHES * 100) * 5, 3)
    cell = int(CELL_INCHES * 100)
    cells = [px[:cell, c * cell : (c + 1) * cell] for c in range(5)]
    # every cell drew something (not a blank white square), and the cells differ
    for c in cells:
        assert c.std() > 10
    assert len({c.tobytes() for c in cells}) == 5

    # the normals cell is colourful (RGB), the edge cell is grey
    def saturation(c: np.ndarray) -> float:
        return float((c.max(-1).astype(int) - c.min(-1)).mean())

    assert saturation(cells[3]) > saturation(cells[1]) + 5


def test_gallery_from_store_and_failures(images: list[Path], tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "store", size=48)
    experts = _experts()
    report = run_experts(images[:1], experts, store)
    assert report.computed == 4
    out = tmp_path / "from_store.png"
    assert render_gallery(images[:1], experts, out, store=store) == []
    # the second image is not in the store: its cells say so instead of showing zeros
    failures = render_gallery(
        images, experts, tmp_path / "missing.png", store=store, log=lambda m: None
    )
    assert len(failures) == 4 and all(Path(images[1]).name in f for f in failures)
    assert "prismkit experts run" in failures[0]
    broken = render_gallery(
        images[:1],
        {"edge": CannyEdges(), "broken": Broken()},
        tmp_path / "b.png",
        log=lambda m: None,
    )
    assert len(broken) == 1 and "'broken'" in broken[0] and "weights are corrupt" in broken[0]
    assert (tmp_path / "b.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="at least one image"):
        render_gallery([], experts, tmp_path / "none.png")


def test_experts_show_command(images: list[Path], tmp_path: Path, capsys) -> None:
    parser = build_parser(get_plugin_manager())
    out = tmp_path / "show.png"
    args = parser.parse_args(
        ["experts", "show", *map(str, images), "-o", str(out), "--experts", "edge,seg_superpixel",
         "--device", "cpu", "--size", "64"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert "2 image(s) x 2 expert(s)" in capsys.readouterr().out
    assert _pixels(out).shape == (int(CELL_INCHES * 100) * 2, int(CELL_INCHES * 100) * 3, 3)
