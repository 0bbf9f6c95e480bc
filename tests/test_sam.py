"""The segment-anything expert: architecture as segment-anything builds it, the checkpoint path
(official files in a cache folder or a given file, read with ``weights_only=True``), naming masks
by a tagger's vote, painting, the reference mask generator unchanged, and the commands.

A tiny SAM (``TINY_SAM_ARCH``) with random weights stands in for the official checkpoints: it is
saved as they are (a ``torch.save``d state dict) and loaded through the same path. The
expert-battery checks (contract, determinism, bad input) are in ``test_experts.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import inspect  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_sam import TINY_SAM, save_tiny_sam  # noqa: E402

from prismkit.core.expert import LabelMap  # noqa: E402
from prismkit.experts import sam as sam_module  # noqa: E402
from prismkit.experts.sam import (  # noqa: E402
    OFFICIAL_FILES,
    SAM_ARCHS,
    SAM_URL,
    SamSegmentation,
    build_sam,
    load_sam,
    name_masks,
    paint_masks,
)

NO_FILTERS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """The mask generator runs thousands of tiny tensor operations; on a CPU shared with other
    jobs, OpenMP barriers between 2 threads make them ~30x slower than on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """skimage's astronaut at 64x80: ``(1, 3, 64, 80)`` in [0, 1]."""
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((80, 64), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def _tags(h: int, w: int, names: list[str]) -> LabelMap:
    tags = torch.zeros(1, h, w, dtype=torch.long)
    tags[..., : w // 2] = 1
    return LabelMap(tags, [names])


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_build_sam_is_segment_anythings_model(model_type: str) -> None:
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # no memory, no init time
        ours = build_sam(SAM_ARCHS[model_type])
        ref = sam_model_registry[model_type]()
    assert repr(ours) == repr(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert not ours.training and not ref.training
    # what repr and shapes do not show: heads, windows, global blocks, pixel normalisation
    for a, b in zip(ours.image_encoder.blocks, ref.image_encoder.blocks, strict=True):
        assert (a.window_size, a.attn.num_heads) == (b.window_size, b.attn.num_heads)
    pairs = zip(
        ours.mask_decoder.transformer.layers, ref.mask_decoder.transformer.layers, strict=True
    )
    for a, b in pairs:
        assert a.self_attn.num_heads == b.self_attn.num_heads
    assert torch.equal(ours.pixel_mean, ref.pixel_mean) and torch.equal(
        ours.pixel_std, ref.pixel_std
    )


def test_mask_generator_defaults_are_the_reference() -> None:
    from segment_anything import SamAutomaticMaskGenerator

    ref = inspect.signature(SamAutomaticMaskGenerator).parameters
    ours = SamSegmentation().generator_options
    assert ours == {k: ref[k].default for k in ours}


# ---------------------------------------------------------------- naming and painting


def test_name_masks_majority_vote() -> None:
    tags = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 3, 3],
            [2, 2, 3, 3],
        ]
    )
    names = ["background", "cat", "dog", "cat"]  # two "cat" instances vote together
    masks = torch.zeros(5, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # all background -> None
    masks[1, :, 2:] = True  # cat 2 + cat 2 -> cat
    masks[2, 1:, :3] = True  # background 2, cat 1, dog 4, cat 1 -> dog (cat has 2)
    masks[3, 1, 1:3] = True  # background 1, cat 1: tie -> the earlier name, background
    masks[4] = False  # empty -> None
    assert name_masks(masks, tags, names) == [None, "cat", "dog", None, None]
    assert name_masks(masks[:0], tags, names) == []
    # a tie between two tags goes to the one the tagger lists first
    tie = torch.zeros(1, 4, 4, dtype=torch.bool)
    tie[0, 1:3, 1:3] = True  # background 1, cat 1 + 1, dog 1
    assert name_masks(tie, tags, ["background", "cat", "dog", "cat"]) == ["cat"]
    assert name_masks(tie, tags, ["background", "dog", "cat", "dog"]) == ["dog"]


def test_paint_masks_largest_first() -> None:
    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True  # area 4
    masks[1, :, :4] = True  # area 24
    masks[2, 4:, 4:] = True  # area 4, tie with mask 0: lower index first
    out, order = paint_masks(masks)
    assert order == [1, 0, 2]
    assert out[1, 1] == 2  # the small mask sits on top of the big one
    assert out[0, 0] == 1 and out[5, 5] == 3 and out[0, 5] == 0
    empty, none = paint_masks(masks[:0])
    assert none == [] and empty.shape == (6, 6) and empty.sum() == 0


# ---------------------------------------------------------------- checkpoint path


def test_loads_the_checkpoint_exactly(tiny: Path) -> None:
    expert = SamSegmentation(weights=str(tiny), model_type=TINY_SAM)
    assert expert._sam is None  # the constructor read nothing
    expert.load()
    saved = torch.load(tiny, weights_only=True)
    got = expert._sam.state_dict()
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert not expert._sam.training
    assert not any(p.requires_grad for p in expert._sam.parameters())
    assert not any(t.is_meta for t in [*got.values(), expert._sam.pixel_mean])
    assert expert.generator.predictor.model is expert._sam


def test_safetensors_checkpoint(tiny: Path, tmp_path: Path, photo: torch.Tensor) -> None:
    from safetensors.torch import save_file

    state = torch.load(tiny, weights_only=True)
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    tags = {"obj_tags_cam": _tags(64, 80, ["background", "cat"])}
    opts = {"model_type": TINY_SAM, "points_per_side": 4, **NO_FILTERS}
    a = SamSegmentation(weights=str(tiny), **opts).predict(photo, tags)
    b = SamSegmentation(weights=str(st), **opts).predict(photo, tags)
    assert torch.equal(a.values, b.values) and a.names == b.names


class Payload:
    """Anything a state dict is not: a checkpoint holding it must never be unpickled."""


def test_bad_checkpoints_one_line_errors(tiny: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pth"
    torch.save({"x": Payload()}, pickled)
    with pytest.raises(ValueError, match=r"seg_sam.*pickled\.pth.*weights_only=True") as e:
        SamSegmentation(weights=str(pickled), model_type=TINY_SAM).load()
    assert "\n" not in str(e.value)

    not_tensors = tmp_path / "numbers.pth"
    torch.save({"x": 1}, not_tensors)
    with pytest.raises(ValueError, match=r"numbers\.pth is not a SAM checkpoint"):
        SamSegmentation(weights=str(not_tensors), model_type=TINY_SAM).load()

    # the tiny file read as an official vit_b: every mismatch counted, one line
    with pytest.raises(ValueError, match=r"does not fit SAM model type vit_b") as e:
        SamSegmentation(weights=str(tiny), model_type="vit_b").load()
    msg = str(e.value)
    assert "\n" not in msg and "shape" in msg and "missing" in msg and "model_type" in msg

    partial = tmp_path / "partial.pth"
    state = torch.load(tiny, weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"1 missing \(first: mask_decoder\.iou_token\.weight\)"):
        SamSegmentation(weights=str(partial), model_type=TINY_SAM).load()

    with pytest.raises(FileNotFoundError, match=r"seg_sam.*nothing\.pth does not exist"):
        SamSegmentation(weights=str(tmp_path / "nothing.pth"), model_type="vit_b").load()


def test_official_files_in_the_cache_folder(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo: torch.Tensor
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    # nothing there: says which files, from where, into which folder
    status = SamSegmentation().weights_status()
    assert not status.available
    for f in OFFICIAL_FILES.values():
        assert f in status.where
    assert SAM_URL in status.where and str(folder) in status.where and "weights=" in status.where
    only_b = SamSegmentation(model_type="vit_b").weights_status().where
    assert OFFICIAL_FILES["vit_b"] in only_b and OFFICIAL_FILES["vit_h"] not in only_b
    with pytest.raises(FileNotFoundError, match="seg_sam.*sam_vit_h_4b8939.pth"):
        SamSegmentation().load()

    # the tiny model stands in for vit_b: same file name, same loading code
    monkeypatch.setitem(SAM_ARCHS, "vit_b", TINY_SAM)
    folder.mkdir(parents=True)
    (folder / OFFICIAL_FILES["vit_b"]).write_bytes(tiny.read_bytes())
    status = SamSegmentation().weights_status()  # auto: the largest type found
    assert status.available and status.where == f"{folder / OFFICIAL_FILES['vit_b']} (vit_b)"
    assert not SamSegmentation(model_type="vit_h").weights_status().available
    expert = SamSegmentation(points_per_side=4, **NO_FILTERS)
    out = expert.predict(photo, {"obj_tags_cam": _tags(64, 80, ["background", "cat"])})
    assert out.values.shape == (1, 64, 80)
    # another cache folder, given as an option
    assert not SamSegmentation(cache_dir=str(tmp_path / "elsewhere")).weights_status().available
    assert SamSegmentation(cache_dir=str(folder)).weights_status().available


def test_model_type_from_the_file_name(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(SAM_ARCHS, "vit_l", TINY_SAM)
    named = tmp_path / "sam_vit_l_0b3195.pth"
    named.write_bytes(tiny.read_bytes())
    status = SamSegmentation(weights=str(named)).weights_status()
    assert status.available and status.where.endswith("(vit_l)")
    SamSegmentation(weights=str(named)).load()
    unnamed = tmp_path / "my_sam.pth"
    unnamed.write_bytes(tiny.read_bytes())
    status = SamSegmentation(weights=str(unnamed)).weights_status()
    assert not status.available and "model_type" in status.where
    with pytest.raises(ValueError, match="seg_sam.*cannot be told from its name"):
        SamSegmentation(weights=str(unnamed)).load()
    assert not SamSegmentation(model_type=TINY_SAM).weights_status().available  # no file


def test_load_sam_peak_is_one_copy(tiny: Path) -> None:
    """The model holds the file's tensors: built on the meta device, filled by assignment."""
    sam = load_sam(tiny, TINY_SAM, "tiny")
    assert all(p.device.type == "cpu" for p in sam.parameters())


# ---------------------------------------------------------------- prediction


def test_options_checked() -> None:
    with pytest.raises(ValueError, match="seg_sam.*model_type"):
        SamSegmentation(model_type="vit_x")
    with pytest.raises(ValueError, match="seg_sam.*points_per_side"):
        SamSegmentation(points_per_side=0)
    with pytest.raises(ValueError, match="seg_sam.*pred_iou_thresh"):
        SamSegmentation(pred_iou_thresh=1.5)


def test_end_to_end_on_a_photo_with_cam_tags(tiny: Path, photo: torch.Tensor) -> None:
    """The CAM tagger and the tiny SAM on a real photo; the masks are the reference generator's,
    named by the vote and painted largest first."""
    from segment_anything import SamAutomaticMaskGenerator

    from prismkit.experts.cam import CAMTags
    from prismkit.experts.sam import read_state_dict

    tags = CAMTags(rel_threshold=0.0).predict(photo, {})  # every pixel tagged
    expert = SamSegmentation(
        weights=str(tiny), model_type=TINY_SAM, points_per_side=8, **NO_FILTERS
    )
    out = expert.predict(photo, {"obj_tags_cam": tags})
    SamSegmentation.check_output(out, photo)

    # the reference: segment-anything's generator on the plainly loaded model
    ref_model = build_sam(TINY_SAM)
    ref_model.load_state_dict(read_state_dict(tiny))
    gen = SamAutomaticMaskGenerator(ref_model, points_per_side=8, **NO_FILTERS)
    image = (photo[0].permute(1, 2, 0) * 255).round().byte().numpy()
    records = gen.generate(np.ascontiguousarray(image))
    masks = torch.from_numpy(np.stack([r["segmentation"] for r in records]))
    assert len(masks) >= 1
    assert torch.equal(expert.masks(photo[0]), masks)
    # the vote, computed here from the records
    cam_names = tags.names[0]
    expected = []
    for m in masks:
        counts = np.bincount(tags.values[0][m].numpy(), minlength=len(cam_names))
        expected.append(None if counts.argmax() == 0 else cam_names[counts.argmax()])
    kept = [i for i, n in enumerate(expected) if n is not None]
    assert kept, "with every pixel tagged, some mask is named"
    areas = [int(masks[i].sum()) for i in kept]
    order = [kept[j] for j in sorted(range(len(kept)), key=lambda j: (-areas[j], j))]
    assert out.names == [["background", *(expected[i] for i in order)]]
    assert set(out.names[0][1:]) <= set(cam_names[1:])
    # the smallest named mask is on top: all its pixels carry its index
    assert (out.values[0][masks[order[-1]]] == len(order)).all()


def test_masks_named_by_another_tagger(tiny: Path, photo: torch.Tensor) -> None:
    """Another tagger is a subclass declaring it in ``requires``; the expert reads whatever
    expert that names."""

    class SamByDetection(SamSegmentation):
        name = "seg_sam_det"
        requires = ("obj_detection",)

    tags = LabelMap(torch.full((1, 64, 80), 2), [["background", "person", "kite"]])
    expert = SamByDetection(weights=str(tiny), model_type=TINY_SAM, points_per_side=4, **NO_FILTERS)
    out = expert.predict(photo, {"obj_detection": tags})
    assert len(out.names[0]) >= 2 and set(out.names[0][1:]) == {"kite"}
    with pytest.raises(ValueError, match="seg_sam_det.*obj_detection"):
        expert.predict(photo, {"obj_tags_cam": tags})


def test_tagger_input_checked(tiny: Path, photo: torch.Tensor) -> None:
    expert = SamSegmentation(weights=str(tiny), model_type=TINY_SAM, points_per_side=4)
    with pytest.raises(ValueError, match="seg_sam.*obj_tags_cam"):
        expert.predict(photo, {})
    with pytest.raises(ValueError, match="seg_sam.*semantic"):
        expert.predict(photo, {"obj_tags_cam": LabelMap(torch.rand(1, 1, 64, 80))})
    with pytest.raises(ValueError, match="seg_sam.*batch"):
        expert.predict(photo, {"obj_tags_cam": LabelMap(torch.zeros(2, 64, 80).long(), [[]] * 2)})
    # a tag map of another size is resized (nearest) to the image
    small = LabelMap(torch.ones(1, 16, 20, dtype=torch.long), [["background", "cat"]])
    assert expert.predict(photo, {"obj_tags_cam": small}).values.shape == (1, 64, 80)


# ---------------------------------------------------------------- commands


def test_plugins_lists_where_the_weights_go(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from prismkit.core.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["plugins"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("seg_sam"))
    assert "MISSING" in line and OFFICIAL_FILES["vit_b"] in line and SAM_URL in line
    assert "requires=['obj_tags_cam']" in line and "<- sam" in line


def test_experts_show_renders_seg_sam(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``prismkit plugins`` and ``prismkit experts show --experts seg_sam`` with the tiny model as
    the cached vit_b file (default options: the CLI constructs experts with none)."""
    from skimage import data

    from prismkit.core.cli import main
    from prismkit.labels.gallery import CELL_INCHES

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(sam_module.SAM_ARCHS, "vit_b", TINY_SAM)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / OFFICIAL_FILES["vit_b"]).write_bytes(tiny.read_bytes())
    assert main(["plugins"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("seg_sam"))
    assert "[available:" in line and "(vit_b)" in line

    image = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((64, 64)).save(image)
    out = tmp_path / "show.png"
    argv = ["experts", "show", str(image), "-o", str(out), "--experts", "seg_sam"]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "1 image(s) x 2 expert(s)" in printed.out  # seg_sam and the tagger it requires
    assert "adding expert 'obj_tags_cam'" in printed.err
    px = np.asarray(Image.open(out).convert("RGB"))
    assert px.shape == (int(CELL_INCHES * 100), int(CELL_INCHES * 100) * 3, 3)


# ---------------------------------------------------------------- benchmark script


def test_speed_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``bench/sam_speed.py`` end to end with the tiny architecture standing in for vit_b."""
    import json

    from prismkit.bench import sam_speed

    monkeypatch.setitem(SAM_ARCHS, "vit_b", TINY_SAM)
    out = tmp_path / "speed.json"
    argv = ["--size", "64", "--repeats", "1", "--warmup", "0", "--points-per-side", "2"]
    assert sam_speed.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for case in ("reference filters", "filters off"):
        assert result[case]["s_per_image"] > 0 and result[case]["encoder_s"] > 0
    assert result["model_type"] == "vit_b" and result["points_per_side"] == 2
    assert sam_speed.main([*argv, "--out", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
