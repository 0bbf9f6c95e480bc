"""The inference and evaluation commands as a user runs them: caption, ask (--candidates), eval,
configs, retrieval, train --run; one bad image fails alone and named; progress bars on a
terminal."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import easy_vqa
import pytest
from helpers import TestPlugin, tiny_cli_sets, tiny_config
from PIL import Image

from prismkit.core.checkpoint import load_checkpoint, save_checkpoint
from prismkit.core.cli import main
from prismkit.core.generation import BeamConfig
from prismkit.core.host import get_plugin_manager
from prismkit.core.model import create_model
from prismkit.core.processor import Processor
from prismkit.engine.evaluate import Predictor, evaluate_datasets
from prismkit.engine.train import EvalConfig
from prismkit.labels.feeder import ExpertFeeder


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory) -> Path:
    """A tiny Prismer (edge expert) checkpoint, random weights."""
    import torch

    torch.manual_seed(0)
    host = get_plugin_manager(extra_plugins=[TestPlugin()])
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(create_model(tiny_config(tiny_dir), host), path, host)
    return path


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pics")
    out = []
    for i, p in enumerate(sorted(easy_vqa.get_test_image_paths().values())[:3]):
        out.append(root / f"shape{i}.png")
        shutil.copy(p, out[-1])
    return out


def _predictor(ckpt: Path) -> Predictor:
    host = get_plugin_manager()
    model = load_checkpoint(ckpt, host).eval()
    feeder = ExpertFeeder(model, host, "", compute_missing=True)
    return Predictor(model, Processor.from_config(model.config), feeder)


BEAM = ["--beams", "2", "--max-length", "6", "--min-length", "2"]


def test_caption_prints_one_caption_per_image(ckpt, pics, capsys):
    assert main(["caption", str(ckpt), *map(str, pics[:2]), *BEAM]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = _predictor(ckpt).caption(list(map(str, pics[:2])), "a picture of", BeamConfig(2, 6, 2))
    assert lines == [f"{p}\t{c}" for p, c in zip(pics[:2], want, strict=True)]
    assert all(c.strip() for c in want)


def test_caption_one_bad_image_fails_alone(ckpt, pics, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["caption", str(ckpt), str(pics[0]), str(bad), str(pics[1]), *BEAM]) == 1
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [
        f"prismkit: error: image {bad}: cannot be read ({cap.err.split('cannot be read (')[1].strip()}"
    ]
    want = _predictor(ckpt).caption([str(pics[0]), str(pics[1])], "a picture of", BeamConfig(2, 6, 2))  # fmt: skip
    assert cap.out.splitlines() == [f"{pics[0]}\t{want[0]}", f"{pics[1]}\t{want[1]}"]


def test_decompression_bombs_are_named(ckpt, pics, tmp_path, capsys, monkeypatch):
    """An image over PIL's decompression-bomb limit (a traceback before) in caption, ask and
    experts show: the image is named with the fix; the other images still get their output."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2 x 1000: a bomb
    small = tmp_path / "small.png"
    PILImage.new("RGB", (20, 20), (255, 0, 0)).save(small)
    assert main(["caption", str(ckpt), str(pics[0]), str(small), *BEAM]) == 1
    cap = capsys.readouterr()
    assert f"image {pics[0]}: too large to decode safely" in cap.err
    assert "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file" in cap.err
    assert cap.out.startswith(f"{small}\t") and len(cap.out.splitlines()) == 1
    assert main(["ask", str(ckpt), str(pics[0]), "what shape?"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"image {pics[0]}: too large to decode safely" in err
    out = tmp_path / "gallery.png"
    code = main(["experts", "show", str(pics[0]), str(small), "--experts", "edge", "--device", "cpu", "-o", str(out)])  # fmt: skip
    assert code == 1 and out.is_file()
    cap = capsys.readouterr()
    assert f"image {pics[0]}: too large to decode safely" in cap.out
    assert f"wrote {out}: 2 image(s) x 1 expert(s)" in cap.out
    monkeypatch.undo()
    assert Image.open(out).size[1] > 500  # two rows drawn (3 inches each at 100 dpi)


def test_ask_with_and_without_candidates(ckpt, pics, capsys):
    q = "what color is the shape?"
    assert main(["ask", str(ckpt), str(pics[0]), q, "--candidates", "red, green,blue"]) == 0
    answer = capsys.readouterr().out.strip()
    pred = _predictor(ckpt)
    assert answer == pred.answer([str(pics[0])], [q], ["red", "green", "blue"])[0]
    assert answer in {"red", "green", "blue"}
    assert main(["ask", str(ckpt), str(pics[0]), q]) == 0
    assert capsys.readouterr().out.strip() == pred.answer([str(pics[0])], [q])[0]
    assert main(["ask", str(ckpt), str(pics[0]), q, "--candidates", " , "]) == 2
    assert "--candidates ' , ' names no answer" in capsys.readouterr().err


def test_eval_vqa_and_captions(ckpt, tmp_path, capsys, umask_002):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(ckpt), "--set", 'data.dataset="easyvqa"', "--limit", "6", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["samples"] == 6.0 and 0 <= metrics["vqa_accuracy"] <= 1
    pred = _predictor(ckpt)
    want = evaluate_datasets(pred.model, pred.processor, get_plugin_manager(), "easyvqa", "test", {}, pred.feeder, EvalConfig(), 6)  # fmt: skip
    assert metrics == want
    assert f"{'vqa_accuracy':<22}{want['vqa_accuracy']:>10.4f}" in printed
    assert oct(out.stat().st_mode & 0o777) == "0o664"
    run = tmp_path / "eval.toml"
    run.write_text('[data]\ndataset = "easyvqa_captions"\n[eval]\nbeams = 2\nmax_length = 6\nmin_length = 2\njava_metrics = "off"\n')  # fmt: skip
    assert main(["eval", str(ckpt), "--run", str(run), "--limit", "4", "--out", str(out)]) == 0
    caps = json.loads(out.read_text())
    assert set(caps) == {"bleu4", "rouge_l", "cider", "samples"} and caps["samples"] == 4.0
    assert all(caps[k] >= 0 for k in ("bleu4", "rouge_l", "cider"))


@pytest.fixture
def umask_002():
    import os

    old = os.umask(0o002)
    yield
    os.umask(old)


def test_configs_lists_every_registered_config(capsys):
    assert main(["configs"]) == 0
    rows = capsys.readouterr().out.splitlines()
    host = get_plugin_manager()
    assert [r.split()[0] for r in rows] == host.model_configs.names()
    tiny = next(r for r in rows if r.split()[0] == "tiny")
    assert tiny.endswith("<- configs") and "core/configs/tiny.toml" in tiny
    assert any(r.split()[0] == "blip_pretrain_base" and r.endswith("<- blip") for r in rows)


def test_train_with_a_run_config(tiny_dir, tmp_path):
    """--run TOML sets [data], [train], [eval]; a flag overrides the file (the documented
    precedence); the checkpoint records the run config it used."""
    from prismkit.core.checkpoint import read_metadata

    run = tmp_path / "run.toml"
    run.write_text(
        f'[data]\ndataset = "easyvqa_captions"\nfraction = 0.05\n[train]\nsteps = 3\nbatch_size = 2\n'
        f'eval_questions = 0\nout_dir = "{tmp_path / "a"}"\nlog_every = 1\n[eval]\nbeams = 2\n'
    )
    assert main(["train", "tiny", *tiny_cli_sets(tiny_dir), "--run", str(run)]) == 0
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["steps"] == 3
    meta = read_metadata(tmp_path / "a" / "model.safetensors")["extra"]["run"]
    assert meta["data"]["dataset"] == "easyvqa_captions" and meta["eval"]["beams"] == 2
    assert meta["train"]["out_dir"] == str(tmp_path / "a")
    assert main(["train", "tiny", *tiny_cli_sets(tiny_dir), "--run", str(run), "--steps", "2", "--out-dir", str(tmp_path / "b")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "b" / "result.json").read_text())["steps"] == 2


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal(host, tiny_dir, tmp_path, monkeypatch, capsys):
    """On a terminal, training, evaluation and label runs draw tqdm bars; off a terminal (pipes,
    CI logs) there are none and training prints its log lines."""
    from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train
    from prismkit.experts.edges import CannyEdges
    from prismkit.labels.runner import run_experts
    from prismkit.labels.store import LabelStore

    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    run = RunConfig(
        data=DataConfig(dataset="easyvqa", fraction=0.01),
        train=TrainConfig(steps=2, batch_size=2, eval_questions=4, out_dir=str(tmp_path / "r")),
    )
    train(tiny_config(tiny_dir), run, host)
    run_experts([easy_vqa.get_test_image_paths()[0]], {"edge": CannyEdges()}, LabelStore(tmp_path / "s"))  # fmt: skip
    bars = tty.getvalue()
    assert "train: 100%" in bars and "2/2" in bars
    assert "eval easyvqa" in bars and "labels: 100%" in bars
    monkeypatch.undo()
    capsys.readouterr()
    run.train.out_dir = str(tmp_path / "q")
    train(tiny_config(tiny_dir), run, host)
    cap = capsys.readouterr()
    assert "%|" not in cap.err and "step     0" in cap.out


def test_progress_off_a_terminal_is_a_line_every_so_often(capsys):
    """In a pipe or CI log a long evaluation is not silent: a plain line every ``every_s``."""
    from prismkit.core.progress import Progress

    p = Progress(3, "eval easyvqa", unit="sample", every_s=0)
    assert not p.on_terminal
    for _ in range(3):
        p.update(1)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"eval easyvqa: {i}/3 samples" for i in (1, 2, 3)]  # fmt: skip
