"""Label store and precompute run: layout, lossless round trips, resuming after a real kill and an
injected interrupt, version bumps, bad images, failing experts, shards, workers, and the CLI."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import ClassVar  # noqa: E402

import easy_vqa  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from prismkit.core.cli import build_parser  # noqa: E402
from prismkit.core.expert import Expert, LabelMap  # noqa: E402
from prismkit.core.host import get_plugin_manager as _host  # noqa: E402
from prismkit.core.processor import load_image  # noqa: E402
from prismkit.experts.edges import CannyEdges  # noqa: E402
from prismkit.experts.segmentation import SuperpixelSegmentation  # noqa: E402
from prismkit.labels.runner import (  # noqa: E402
    dependency_order,
    list_images,
    parse_shard,
    run_experts,
)
from prismkit.labels.store import LabelStore, MissingLabelsError, file_sha256  # noqa: E402


# ------------------------------------------------------------------ fake experts
class Counting(Expert):
    """Dense: the grey image; counts the images it labels (class-wide)."""

    name = "counting"
    kind = "dense"
    channels = 1
    seen: ClassVar[list[int]] = [0]

    def predict(self, images, inputs):
        Counting.seen[0] += images.shape[0]
        return LabelMap(images.mean(1, keepdim=True))


class CountingV2(Counting):
    version = "2"


class Interrupting(Counting):
    """Like ``Counting`` but a Ctrl-C arrives once it has labelled ``limit`` images."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def predict(self, images, inputs):
        if Counting.seen[0] >= self.limit:
            raise KeyboardInterrupt
        return super().predict(images, inputs)


class Halves(Expert):
    """Semantic: left half 1, right half 2, with per-image names."""

    name = "halves"
    kind = "semantic"
    channels = 64

    def predict(self, images, inputs):
        b, _, h, w = images.shape
        idx = torch.ones(b, h, w, dtype=torch.long)
        idx[..., w // 2 :] = 2
        return LabelMap(idx, [["background", "left", f"right {i}"] for i in range(b)])


class Picky(Expert):
    """Dense; raises on bright images (mean > 0.8): an expert that fails on some inputs."""

    name = "picky"
    kind = "dense"
    channels = 1

    def predict(self, images, inputs):
        if bool((images.mean(dim=(1, 2, 3)) > 0.8).any()):
            raise RuntimeError("cannot handle bright images")
        return LabelMap(images[:, :1].clone())


class AfterPicky(Expert):
    """Dense, requires ``picky``: the complement of its map."""

    name = "after_picky"
    kind = "dense"
    channels = 1
    requires = ("picky",)

    def predict(self, images, inputs):
        return LabelMap(1 - inputs["picky"].values)


class Slow(Expert):
    """Same store key as the subprocess's slow expert below (name ``slow``, version 1)."""

    name = "slow"
    kind = "dense"
    channels = 1
    seen: ClassVar[list[int]] = [0]

    def predict(self, images, inputs):
        Slow.seen[0] += images.shape[0]
        return LabelMap(images.mean(1, keepdim=True))


# ------------------------------------------------------------------ fixtures
def _small(arr: np.ndarray, w: int = 40, h: int = 32) -> Image.Image:
    return Image.fromarray(arr).resize((w, h))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Nested folders, mixed formats and modes (RGB, L, RGBA, I;16, P, CMYK), a non-image file and
    a corrupt PNG, all small."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    (root / "c" / "d" / "e").mkdir(parents=True)
    _small(data.astronaut()).save(root / "astronaut.png")
    _small(data.coffee()).save(root / "a" / "b" / "coffee.JPG", quality=95)
    _small(data.camera()).save(root / "a" / "camera_grey.bmp")
    rgba = np.dstack([np.asarray(_small(data.chelsea())), np.full((32, 40), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "c" / "chelsea_rgba.png")
    deep = (np.asarray(_small(data.camera()), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(root / "c" / "d" / "e" / "deep16.tif")
    _small(data.rocket()).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    _small(data.coffee()).convert("CMYK").save(root / "c" / "cmyk.jpg")
    _small(data.chelsea()).save(root / "c" / "d" / "chelsea.webp")
    Image.new("RGB", (40, 32), (250, 250, 250)).save(root / "white.png")
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    for p in sorted(easy_vqa.get_train_image_paths().values())[:12]:
        shutil.copy(p, root / Path(p).name)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


# ------------------------------------------------------------------ listing, shards, order
def test_list_images_recursive_mixed_formats_sorted(image_dir: Path) -> None:
    found = [p.relative_to(image_dir).as_posix() for p in list_images([image_dir])]
    assert found == [
        "a/b/coffee.JPG",
        "a/broken.png",
        "a/camera_grey.bmp",
        "astronaut.png",
        "c/chelsea_rgba.png",
        "c/cmyk.jpg",
        "c/d/chelsea.webp",
        "c/d/e/deep16.tif",
        "palette.png",
        "white.png",
    ]
    # files and folders mix, duplicates collapse
    assert list_images([image_dir / "palette.png", image_dir / "c" / "d"]) == [
        image_dir / "c" / "d" / "chelsea.webp",
        image_dir / "c" / "d" / "e" / "deep16.tif",
        image_dir / "palette.png",
    ]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images([image_dir / "nowhere"])


def test_parse_shard_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard() == (0, 1)
    assert parse_shard("2/4") == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard() == (1, 3)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="RANK"):
            parse_shard(bad)


def test_dependency_order_and_missing_requirement() -> None:
    assert dependency_order({"after_picky": AfterPicky(), "picky": Picky()}) == [
        "picky",
        "after_picky",
    ]
    with pytest.raises(ValueError, match="'after_picky' requires \\['picky'\\]"):
        dependency_order({"after_picky": AfterPicky()})


# ------------------------------------------------------------------ store
def test_store_round_trip_layout_and_missing(tmp_path: Path, image_dir: Path) -> None:
    store = LabelStore(tmp_path / "store")
    img = image_dir / "astronaut.png"
    sha = file_sha256(img)
    dense = torch.rand(1, 3, 32, 40) * 10 - 5
    path = store.put(img, Counting, LabelMap(dense))
    assert (
        path == tmp_path / "store" / "counting" / "v1" / "native" / sha[:2] / f"{sha}.safetensors"
    )
    got = store.get(img, Counting).values
    assert got.dtype == torch.float32 and got.shape == (1, 3, 32, 40)
    assert torch.allclose(got, dense, rtol=2**-11, atol=1e-7)  # float16: relative error <= 2^-11
    # values beyond float16's range are kept as float32, exactly
    huge = torch.full((1, 1, 4, 4), 1e6)
    store.put(img, Picky, LabelMap(huge))
    assert torch.equal(store.get(img, Picky).values, huge)
    # semantic: uint16 indices and names, exact
    idx = torch.randint(0, 300, (1, 32, 40))
    names = [["background", *(f"label {i}" for i in range(1, 300))]]
    store.put(img, Halves, LabelMap(idx, names))
    sem = store.get(img, Halves)
    assert torch.equal(sem.values, idx) and sem.values.dtype == torch.int64 and sem.names == names
    # a plain safetensors file with one JSON metadata entry, no pickle
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["prismkit"])
    assert header["values"]["dtype"] == "F16"
    assert meta["expert"] == "counting" and meta["version"] == "1" and meta["sha256"] == sha
    assert not list((tmp_path / "store").rglob("*.tmp"))
    # keyed by content: a renamed copy finds the same labels; an edited image does not
    copy = tmp_path / "renamed.png"
    shutil.copy(img, copy)
    assert store.has(copy, Counting)
    edited = tmp_path / "edited.png"
    Image.open(img).rotate(90).save(edited)
    assert not store.has(edited, Counting)
    with pytest.raises(MissingLabelsError) as err:
        store.get(edited, Counting)
    assert "edited.png" in str(err.value) and "'counting'" in str(err.value)
    # the message points at other stored versions
    with pytest.raises(MissingLabelsError, match="found only v1/native"):
        store.get(img, CountingV2)
    with pytest.raises(ValueError, match="uint16"):
        store.put(img, Halves, LabelMap(torch.full((1, 2, 2), 70000), [["background"]]))


# ------------------------------------------------------------------ run
def test_run_all_formats_corrupt_image_and_failing_expert(tmp_path: Path, image_dir: Path) -> None:
    store = LabelStore(tmp_path / "store")
    experts = {"after_picky": AfterPicky(), "picky": Picky(), "halves": Halves()}
    report = run_experts([image_dir], experts, store, batch_size=4, log=lambda m: None)
    assert report.images == 10
    by_expert = {(Path(f.image).name, f.expert) for f in report.failures}
    assert by_expert == {
        ("broken.png", None),
        ("white.png", "picky"),
        ("white.png", "after_picky"),
    }
    broken = next(f for f in report.failures if f.expert is None)
    assert "broken.png" in broken.message and "cannot be read" in broken.message
    picky = next(f for f in report.failures if f.expert == "picky")
    assert "white.png" in picky.message and "cannot handle bright images" in picky.message
    after = next(f for f in report.failures if f.expert == "after_picky")
    assert "requires ['picky']" in after.message
    assert "FAILED" in report.summary() and "white.png" in report.summary()
    # 8 good images x 3 experts + white.png's halves
    assert report.computed == 8 * 3 + 1
    good = [p for p in list_images([image_dir]) if p.name not in ("broken.png", "white.png")]
    for p in good:
        image = load_image(p)
        picky_map = store.get(p, Picky).values
        assert picky_map.shape == (1, 1, *image.shape[-2:])
        assert torch.allclose(store.get(p, AfterPicky).values, 1 - picky_map, atol=1e-3)
        assert store.get(p, Halves).names[0][0] == "background"
    # a second run finds everything done; only the failures fail again
    again = run_experts([image_dir], experts, store, batch_size=4, log=lambda m: None)
    assert again.computed == 0 and again.skipped == 8 * 3 + 1 and len(again.failures) == 3


def test_resume_after_injected_interrupt(tmp_path: Path, vqa_dir: Path) -> None:
    store = LabelStore(tmp_path / "store")
    Counting.seen[0] = 0
    with pytest.raises(KeyboardInterrupt):
        run_experts([vqa_dir], {"counting": Interrupting(limit=5)}, store, batch_size=1)
    before = _mtimes(store.root)
    assert len(before) == 5
    Counting.seen[0] = 0
    report = run_experts([vqa_dir], {"counting": Counting()}, store, batch_size=3)
    assert Counting.seen[0] == 12 - 5 and report.computed == 7 and report.skipped == 5
    after = _mtimes(store.root)
    assert len(after) == 12
    assert all(after[p] == t for p, t in before.items())  # finished files were not rewritten


def test_resume_after_killing_the_process(tmp_path: Path, vqa_dir: Path) -> None:
    script = tmp_path / "slow_run.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from prismkit.core.expert import Expert, LabelMap
            from prismkit.labels.runner import run_experts
            from prismkit.labels.store import LabelStore

            class Slow(Expert):
                name, kind, channels = "slow", "dense", 1

                def predict(self, images, inputs):
                    time.sleep(0.4)
                    return LabelMap(images.mean(1, keepdim=True))

            run_experts([sys.argv[1]], {"slow": Slow()}, LabelStore(sys.argv[2]), batch_size=1)
            """
        )
    )
    root = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(vqa_dir), str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 40
    while len(list(root.rglob("*.safetensors"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _mtimes(root)
    assert 3 <= len(before) < 12, "the run should have been killed part-way"
    store = LabelStore(root)
    for p in before:  # whatever exists is whole
        assert store.get_key(p.stem, Slow).values.shape == (1, 1, 64, 64)
    Slow.seen[0] = 0
    report = run_experts([vqa_dir], {"slow": Slow()}, store, batch_size=4)
    assert Slow.seen[0] == 12 - len(before) == report.computed
    after = _mtimes(root)
    assert len(after) == 12 and all(after[p] == t for p, t in before.items())


def test_version_change_recomputes_only_that_expert(tmp_path: Path, vqa_dir: Path) -> None:
    store = LabelStore(tmp_path / "store")
    Counting.seen[0] = 0
    run_experts([vqa_dir], {"counting": Counting(), "halves": Halves()}, store)
    assert Counting.seen[0] == 12
    v1 = _mtimes(store.root / "counting" / "v1")
    Counting.seen[0] = 0
    report = run_experts([vqa_dir], {"counting": CountingV2(), "halves": Halves()}, store)
    assert Counting.seen[0] == 12 and report.computed == 12 and report.skipped == 12
    assert len(list((store.root / "counting" / "v2").rglob("*.safetensors"))) == 12
    assert _mtimes(store.root / "counting" / "v1") == v1
    Counting.seen[0] = 0
    assert run_experts([vqa_dir], {"counting": Counting()}, store).computed == 0
    assert Counting.seen[0] == 0


def test_fixed_size_store(tmp_path: Path, image_dir: Path) -> None:
    store = LabelStore(tmp_path / "store", size=24)
    report = run_experts(
        [image_dir / "astronaut.png", image_dir / "palette.png"], {"halves": Halves()}, store
    )
    assert report.computed == 2 and not report.failures
    batch = store.get_batch([image_dir / "astronaut.png", image_dir / "palette.png"], Halves)
    assert batch.values.shape == (2, 24, 24) and len(batch.names) == 2
    assert (store.root / "halves" / "v1" / "24px").is_dir()
    # native sizes differ: get_batch resizes (nearest) to a size, or refuses without one
    native = LabelStore(tmp_path / "native")
    Image.open(image_dir / "astronaut.png").resize((20, 16)).save(tmp_path / "small.png")
    pair = [image_dir / "astronaut.png", tmp_path / "small.png"]
    run_experts(pair, {"halves": Halves(), "counting": Counting()}, native)
    with pytest.raises(ValueError, match="different sizes"):
        native.get_batch(pair, Halves)
    sem = native.get_batch(pair, Halves, size=(8, 10))
    assert sem.values.shape == (2, 8, 10) and sem.values.dtype == torch.int64
    assert sem.values[:, :, :5].eq(1).all() and sem.values[:, :, 5:].eq(2).all()
    dense = native.get_batch(pair, Counting, size=(8, 10))
    assert dense.values.shape == (2, 1, 8, 10) and dense.names is None
    with pytest.raises(MissingLabelsError, match="--size 24"):
        store.get(image_dir / "white.png", Halves)


def test_shards_split_the_images(tmp_path: Path, vqa_dir: Path, monkeypatch) -> None:
    store = LabelStore(tmp_path / "store")
    a = run_experts([vqa_dir], {"halves": Halves()}, store, shard=(0, 2))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    b = run_experts([vqa_dir], {"halves": Halves()}, store)  # shard from the environment
    assert a.images == b.images == 6 and a.computed == b.computed == 6
    assert len(_digests(store.root)) == 12


def test_two_workers_write_identical_files(tmp_path: Path, vqa_dir: Path, image_dir: Path) -> None:
    inputs = [vqa_dir, image_dir / "astronaut.png", image_dir / "c"]
    experts = {"edge": CannyEdges(), "seg_superpixel": SuperpixelSegmentation(n_segments=8)}
    one = run_experts(inputs, experts, LabelStore(tmp_path / "one"), batch_size=4)
    two = run_experts(inputs, experts, LabelStore(tmp_path / "two"), batch_size=4, num_workers=2)
    assert one.computed == two.computed == 2 * 17 and not one.failures and not two.failures
    d1, d2 = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert len(d1) == 34 and d1 == d2


def test_cli_run(tmp_path: Path, vqa_dir: Path, capsys) -> None:
    parser = build_parser(_host())
    args = parser.parse_args(
        ["experts", "run", str(vqa_dir), "--store", str(tmp_path / "s"), "--experts", "edge",
         "--device", "cpu", "--size", "32", "--batch-size", "5"]
    )  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "12 images: 12 label files written" in out
    assert len(list((tmp_path / "s" / "edge" / "v1" / "32px").rglob("*.safetensors"))) == 12


# ------------------------------------------------------------------ damage, stray temporaries
def test_truncated_label_file_is_recomputed_on_rerun(tmp_path: Path, vqa_dir: Path) -> None:
    """A truncated file used to count as stored forever; now its size is checked against its
    header, so a plain rerun recomputes exactly that file."""
    store = LabelStore(tmp_path / "store")
    run_experts([vqa_dir], {"counting": Counting()}, store)
    want = _digests(store.root)
    victim = sorted(store.root.rglob("*.safetensors"))[3]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 100])
    assert not store.has_key(victim.stem, Counting)
    with pytest.raises(ValueError, match="cannot be read"):
        store.get_key(victim.stem, Counting)
    Counting.seen[0] = 0
    report = run_experts([vqa_dir], {"counting": Counting()}, store)
    assert Counting.seen[0] == 1 and report.computed == 1 and report.skipped == 11
    assert len(report.repaired) == 1 and str(victim) in report.repaired[0]
    assert "truncated" in report.summary() and _digests(store.root) == want


def test_corrupt_label_file_is_caught_by_checksum_and_verify(
    tmp_path: Path, vqa_dir: Path, capsys
) -> None:
    """Same size, flipped bytes: reading names the file and the fix; `experts run --verify`
    recomputes it (a plain rerun trusts the size)."""
    parser = build_parser(_host())
    argv = ["experts", "run", str(vqa_dir), "--store", str(tmp_path / "s"), "--experts", "edge", "--device", "cpu"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    store = LabelStore(tmp_path / "s")
    want = _digests(store.root)
    victim = sorted(store.root.rglob("*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    edge = _host().expert("edge")
    with pytest.raises(ValueError, match=r"is damaged \(checksum mismatch\).*--verify"):
        store.get_key(victim.stem, edge)
    capsys.readouterr()
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and "12 already stored" in capsys.readouterr().out
    args = parser.parse_args([*argv, "--verify"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "1 label files written, 11 already stored" in out
    assert "1 damaged label file(s) recomputed" in out and "checksum mismatch" in out
    assert _digests(store.root) == want


def test_killed_two_worker_run_leaves_no_stray_temporary(tmp_path: Path, vqa_dir: Path) -> None:
    """kill -9 of a 2-worker run in the middle of a label write: the next run deletes the
    temporary file the dead worker left (it used to stay forever) and completes the store."""
    script = tmp_path / "hang_run.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            from pathlib import Path
            from prismkit.core.expert import Expert, LabelMap
            from prismkit.labels import store as store_mod
            from prismkit.labels.runner import run_experts
            from prismkit.labels.store import LabelStore

            real = store_mod.atomic_write

            def hanging(path, write):  # the 3rd write of each worker hangs half-written
                hanging.n += 1
                if hanging.n < 3:
                    return real(path, write)
                def half(tmp):
                    write(tmp)
                    Path(sys.argv[3], str(os.getpid())).touch()  # tell the test: this worker hangs
                    time.sleep(120)
                real(path, half)

            hanging.n = 0

            class Slow(Expert):
                name, kind, channels = "slow", "dense", 1

                def predict(self, images, inputs):
                    store_mod.atomic_write = hanging
                    return LabelMap(images.mean(1, keepdim=True))

            if __name__ == "__main__":
                run_experts([sys.argv[1]], {"slow": Slow()}, LabelStore(sys.argv[2]), batch_size=1, num_workers=2)
            """
        )
    )
    root, hung = tmp_path / "store", tmp_path / "hung"
    hung.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(vqa_dir), str(root), str(hung)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    # wait for both workers to hang, not for two temporary files: a worker's normal write also
    # has one for a moment, and killing then would leave it with one label written, not two
    while len(list(hung.iterdir())) < 2:
        assert proc.poll() is None, proc.stderr.read()[-2000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: parent and both workers
    proc.wait()
    time.sleep(0.2)
    stray = list(root.rglob(".*.tmp"))
    assert len(stray) == 2 and len(list(root.rglob("*.safetensors"))) == 4
    Slow.seen[0] = 0
    report = run_experts([vqa_dir], {"slow": Slow()}, LabelStore(root), num_workers=1)
    assert (
        report.stale_removed == 2
        and "2 temporary file(s) of killed runs deleted" in report.summary()
    )
    assert list(root.rglob(".*.tmp")) == [] and len(list(root.rglob("*.safetensors"))) == 12
    assert report.computed == Slow.seen[0] == 8
