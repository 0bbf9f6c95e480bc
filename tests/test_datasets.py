"""The built-in dataset readers: what each yields from its file format, and how a bad entry is
reported (file, index and key; every bad entry at once)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prismkit.core.data import CAPTION_PROMPT, DataError, Mixture, build_dataset
from prismkit.core.host import get_plugin_manager
from prismkit.datasets.readers import (
    CocoCaptions,
    ImageFolderCaptions,
    VQAv2,
    WebDatasetCaptions,
    iter_webdataset,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four small solid-colour PNGs (img0..img3) in a folder."""
    root = tmp_path_factory.mktemp("imgs")
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)]):
        Image.new("RGB", (12, 10), colour).save(root / f"img{i}.png")
    return root


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# -- coco_captions -----------------------------------------------------------------------------
def test_coco_dict_format(images, tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "img0.png"}, {"id": 8, "file_name": "img1.png"}],
        "annotations": [
            {"image_id": 7, "caption": " A red square. "},
            {"image_id": 8, "caption": "a green square"},
            {"image_id": 7, "caption": "something red"},
        ],
    }
    path = _write(tmp_path / "c.json", data)
    ds = CocoCaptions(annotations=str(path), image_root=str(images), prompt="caption:")
    assert ds.task == "caption" and len(ds) == 3
    by_target = {s.target: s for s in ds.samples}
    red = by_target["A red square."]
    assert red.image == str(images / "img0.png") and red.image_id == "img0.png"
    assert red.prompt == "caption:" and red.references == ["A red square.", "something red"]
    assert red.source == f"{path} annotations[0]"
    assert by_target["something red"].source == f"{path} annotations[2]"
    assert by_target["a green square"].references == ["a green square"]
    img = ds.image(0)
    assert img.shape == (3, 10, 12) and 0 <= float(img.min()) <= float(img.max()) <= 1


def test_coco_karpathy_list_format_and_fraction(images, tmp_path):
    items = [
        {"image": "img0.png", "caption": ["red", "a red one"]},
        {"image": "img1.png", "caption": "green"},
        {"image": "img2.png", "caption": "blue"},
        {"image": "img3.png", "caption": "grey"},
    ]
    path = _write(tmp_path / "k.json", items)
    ds = CocoCaptions(annotations=str(path), image_root=str(images))
    assert [s.target for s in ds.samples] == ["red", "a red one", "green", "blue", "grey"]
    assert ds.samples[1].references == ["red", "a red one"]
    assert ds.samples[1].source == f"{path} [0].caption[1]"
    assert ds.samples[0].prompt == CAPTION_PROMPT
    half = CocoCaptions(annotations=str(path), image_root=str(images), fraction=0.4, seed=1)
    assert len(half) == 2 and all(s in ds.samples for s in half.samples)
    assert [s.target for s in half.samples] == [
        s.target for s in CocoCaptions(annotations=str(path), image_root=str(images), fraction=0.4, seed=1).samples
    ]  # fmt: skip


def test_coco_errors_all_at_once(images, tmp_path):
    items = [
        {"image": "img0.png"},
        {"image": 3, "caption": "x"},
        {"image": "img1.png", "caption": ["ok", 4]},
        {"image": "nope.png", "caption": "x"},
        ["not", "an", "object"],
    ]
    path = _write(tmp_path / "bad.json", items)
    with pytest.raises(DataError) as e:
        CocoCaptions(annotations=str(path), image_root=str(images))
    msg = str(e.value)
    assert msg.startswith(f"5 bad entries in {path}:")
    assert f"{path} [0]: missing key 'caption'" in msg
    assert f"{path} [1]: 'image' must be a string, got int 3" in msg
    assert f"{path} [2].caption[1]: caption must be a string, got int" in msg
    assert f"{path} [3]: names image {images / 'nope.png'}, which does not exist" in msg
    assert f"{path} [4]: expected an object, got list" in msg
    with pytest.raises(DataError, match="does not exist"):
        CocoCaptions(annotations=str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken.json is not valid JSON: line 1"):
        CocoCaptions(annotations=str(tmp_path / "broken.json"))
    with pytest.raises(DataError, match="expected a COCO dict"):
        CocoCaptions(annotations=str(_write(tmp_path / "n.json", 5)))


# -- vqav2 -------------------------------------------------------------------------------------
def _vqa_files(tmp_path: Path, images: Path) -> tuple[Path, Path]:
    for i in range(3):
        Image.open(images / f"img{i}.png").save(images / f"COCO_val2014_{i:012d}.jpg")
    qs = [
        {"question_id": 10, "image_id": 0, "question": "what color is it?"},
        {"question_id": 11, "image_id": 1, "question": "is it green?"},
        {"question_id": 12, "image_id": 2, "question": "what shape?"},
    ]
    anns = [
        {"question_id": 10, "multiple_choice_answer": "red", "answers": [{"answer": a} for a in ["red"] * 8 + ["pink"] * 2]},
        {"question_id": 11, "multiple_choice_answer": "yes", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 12, "multiple_choice_answer": "square", "answers": []},
    ]  # fmt: skip
    return _write(tmp_path / "q.json", {"questions": qs}), _write(
        tmp_path / "a.json", {"annotations": anns}
    )


def test_vqav2_official_format(images, tmp_path):
    q, a = _vqa_files(tmp_path, images)
    common = dict(questions=str(q), annotations=str(a), image_root=str(images), subtype="val2014")
    test = VQAv2(split="test", **common)
    assert test.task == "vqa" and len(test) == 3
    s = test.samples[0]
    assert s.prompt == "what color is it?" and s.target == "red"  # the reference's raw question
    assert s.references == ["red"] * 8 + ["pink"] * 2 and s.image_id == "0"
    assert s.image == str(images / "COCO_val2014_000000000000.jpg")
    assert s.source == f"{q} questions[0]"
    assert test.samples[2].references == ["square"]  # no annotator answers: the target
    assert sorted(test.answer_list) == ["red", "square", "yes"]
    # training keeps only questions whose answer is in the answer list (top_answers here)
    top1 = VQAv2(split="train", top_answers=1, **common)
    assert len(top1) == 1 and top1.answer_list == [top1.samples[0].target]
    listed = VQAv2(split="train", answer_list=str(_write(tmp_path / "al.json", ["yes", "red"])), **common)  # fmt: skip
    assert [s.target for s in listed.samples] == ["red", "yes"] and listed.answer_list == ["yes", "red"]  # fmt: skip


def test_vqav2_errors_name_file_index_and_key(images, tmp_path):
    q, a = _vqa_files(tmp_path, images)
    qs = json.loads(q.read_text())["questions"]
    qs[1] = {"question_id": 11, "question": "is it green?"}  # KeyError before
    qs.append({"question_id": 13, "image_id": "0", "question": "?"})  # wrong type
    qs.append({"question_id": 14, "image_id": 0, "question": "?"})  # no annotation
    _write(q, {"questions": qs})
    anns = json.loads(a.read_text())["annotations"]
    anns[2]["answers"] = [{"answer": 3}]
    _write(a, {"annotations": anns})
    with pytest.raises(DataError) as e:
        VQAv2(questions=str(q), annotations=str(a), image_root=str(images), subtype="val2014")
    msg = str(e.value)
    assert "4 bad entries" in msg
    assert f"{q} questions[1]: missing key 'image_id'" in msg
    assert f"{q} questions[3]: 'image_id' must be a number, got str '0'" in msg
    assert f"{q} questions[4]: no annotation in {a} for question_id 14" in msg
    assert f"{a} annotations[2].answers[0]: 'answer' must be a string, got int 3" in msg
    _write(a, {"annots": []})
    with pytest.raises(DataError, match=f"{a}: missing key 'annotations'"):
        VQAv2(questions=str(q), annotations=str(a), image_root=str(images))


# -- image_folder ------------------------------------------------------------------------------
def test_image_folder_tsv_and_jsonl(images, tmp_path):
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("img0.png\ta red square\n\nimg0.png\tred\nimg1.png\t a green one \n")
    ds = ImageFolderCaptions(root=str(images), captions=str(tsv))
    assert [(s.image_id, s.target) for s in ds.samples] == [
        ("img0.png", "a red square"),
        ("img0.png", "red"),
        ("img1.png", "a green one"),
    ]
    assert ds.samples[0].references == ["a red square", "red"]
    assert ds.samples[2].source == f"{tsv} line 4"
    jl = tmp_path / "caps.jsonl"
    jl.write_text(
        '{"image": "img2.png", "caption": "blue"}\n{"image": "img3.png", "caption": "grey"}\n'
    )
    ds = ImageFolderCaptions(root=str(images), captions=str(jl))
    assert [s.target for s in ds.samples] == ["blue", "grey"] and ds.samples[
        1
    ].source == f"{jl} line 2"


def test_image_folder_errors(images, tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"image": "img0.png"}\n{"image": "img0.png", "caption": 2}\n{oops\n"str"\n{"image": "gone.png", "caption": "x"}\n{"image": "img1.png", "caption": " "}\n')  # fmt: skip
    with pytest.raises(DataError) as e:
        ImageFolderCaptions(root=str(images), captions=str(jl))
    msg = str(e.value)
    for expected in [
        f"{jl} line 1: missing key 'caption'",
        f"{jl} line 2: 'caption' must be a string, got int 2",
        f"{jl} line 3: not valid JSON",
        f"{jl} line 4: expected an object, got str 'str'",
        f"{jl} line 5: names image {images / 'gone.png'}, which does not exist",
        f"{jl} line 6: empty caption for image img1.png",
    ]:
        assert expected in msg, msg
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("img0.png a caption without a tab\n")
    with pytest.raises(DataError, match=r"bad.tsv line 1: expected 'path<TAB>caption'"):
        ImageFolderCaptions(root=str(images), captions=str(tsv))
    with pytest.raises(DataError, match="captions file .* does not exist"):
        ImageFolderCaptions(root=str(images), captions=str(tmp_path / "none.tsv"))


# -- webdataset --------------------------------------------------------------------------------
def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_webdataset_shards(tmp_path):
    a = _shard(tmp_path / "a.tar", [("s1.png", _png((255, 0, 0))), ("s1.txt", b" a red one "), ("s2.jpg", _png((0, 255, 0))), ("s2.json", b'{"caption": "green"}')])  # fmt: skip
    b = _shard(tmp_path / "b.tar", [("t1.txt", b"blue"), ("t1.png", _png((0, 0, 255)))])
    ds = WebDatasetCaptions(shards=[a, b])
    assert [(s.image_id, s.target) for s in ds.samples] == [("s1", "a red one"), ("s2", "green"), ("t1", "blue")]  # fmt: skip
    assert ds.samples[2].source == f"{b} sample t1" and ds.samples[0].references == ["a red one"]
    img = ds.image(2)  # decoded in memory: a tensor, not a path
    assert isinstance(ds.samples[2].image, torch.Tensor) and img.shape == (3, 6, 8)
    assert torch.allclose(img[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    streamed = list(iter_webdataset([a]))
    assert [k for k, _, _ in streamed] == ["s1", "s2"]


def test_webdataset_errors_all_at_once(tmp_path):
    bad = _shard(tmp_path / "bad.tar", [
        ("k1.png", _png((1, 2, 3))),  # no caption
        ("k2.txt", b"no image"),
        ("k3.png", b"not a png"), ("k3.txt", b"x"),
        ("k4.png", _png((1, 2, 3))), ("k4.json", b"{not json"),
        ("k5.png", _png((1, 2, 3))), ("k5.json", b'{"caption": 7}'),
        ("k6.png", _png((1, 2, 3))), ("k6.txt", b"   "),
        ("k7.png", _png((1, 2, 3))), ("k7.txt", b"fine"),
    ])  # fmt: skip
    with pytest.raises(DataError) as e:
        WebDatasetCaptions(shards=[bad])
    msg = str(e.value)
    assert "6 bad entries" in msg
    for expected in [
        f"shard {bad}: sample k1 has no .txt or .json caption",
        f"shard {bad}: sample k2 has no image",
        f"shard {bad}: sample k3: image cannot be decoded",
        f"shard {bad}: sample k4: .json is not valid JSON",
        f"shard {bad}: sample k5.json: 'caption' must be a string, got int 7",
        f"shard {bad}: sample k6 has an empty caption",
    ]:
        assert expected in msg, msg
    with pytest.raises(DataError, match="sample k1 has no"):  # streaming: the first bad one
        list(iter_webdataset([bad]))
    with pytest.raises(DataError, match="cannot be opened"):
        WebDatasetCaptions(shards=[str(tmp_path / "none.tar")])
    with pytest.raises(DataError, match="'shards' must be a list"):
        WebDatasetCaptions(shards=bad)  # type: ignore[arg-type]


# -- building from the registry -----------------------------------------------------------------
def test_build_dataset_options_and_mixtures(images, tmp_path):
    host = get_plugin_manager()
    path = _write(tmp_path / "k.json", [{"image": f"img{i}.png", "caption": f"c{i}"} for i in range(4)])  # fmt: skip
    ds = build_dataset(host.datasets, "coco_captions", "train", annotations=str(path), image_root=str(images))  # fmt: skip
    assert len(ds) == 4
    with pytest.raises(DataError) as e:
        build_dataset(host.datasets, "coco_captions", "train", annotation=str(path))
    msg = str(e.value)
    assert "unknown option(s) ['annotation']" in msg and "missing option(s) ['annotations']" in msg
    assert "--set 'data.options={annotations=...}'" in msg
    mix = build_dataset(host.datasets, "easyvqa+easyvqa_captions", "test", fraction=0.01)
    assert isinstance(mix, Mixture) and {p.task for p in mix.parts} == {"vqa", "caption"}
    n0 = len(mix.parts[0])
    np.testing.assert_array_equal(mix.image(n0).numpy(), mix.parts[1].image(0).numpy())
    assert mix.samples[n0].source.startswith("easy-vqa test image")
