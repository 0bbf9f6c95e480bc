"""Issue 15, training: nothing lost, nothing overwritten, every bad input named.

A run folder is never silently reused; each step is logged as it happens; a resumable state is
saved on a cadence and on Ctrl-C / SIGTERM; bad values, contradicting flags, missing weights and
bad samples are one-line (or one-line-per-sample) errors before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import easy_vqa
import pytest
import torch
from helpers import tiny_cli_sets, tiny_config
from PIL import Image
from safetensors.torch import load_file

from prismkit.core.cli import main
from prismkit.engine import train as train_mod
from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, default_out_dir, train

FAST = ["--batch-size", "4", "--eval-questions", "0", "--log-every", "100", "--set", "data.fraction=0.02"]  # fmt: skip


def _cli(tiny_dir: Path, out: Path | None, *extra: str) -> list[str]:
    args = ["train", "tiny", *tiny_cli_sets(tiny_dir), *FAST, *extra]
    return args + (["--out-dir", str(out)] if out is not None else [])


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _losses(folder: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "log.jsonl").read_text().splitlines()]


# -- the run folder --------------------------------------------------------------------------
def test_existing_run_is_refused_unless_resume_or_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(tiny_dir, out, "--steps", "2")) == 0
    before = _digest(out)
    assert {"model.safetensors", "log.jsonl", "result.json", "last/state.json"} <= set(before)
    capsys.readouterr()
    assert main(_cli(tiny_dir, out, "--steps", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"run folder {out} is not empty" in err and "--resume" in err and "--overwrite" in err
    assert _digest(out) == before  # nothing was touched
    # --steps -5 is refused before anything happens, even with --overwrite
    assert main(_cli(tiny_dir, out, "--steps", "-5", "--overwrite")) == 2
    assert "train.steps (--steps) must be at least 1, got -5" in capsys.readouterr().err
    assert _digest(out) == before
    (out / "notes.txt").write_text("mine")
    assert main(_cli(tiny_dir, out, "--steps", "3", "--overwrite")) == 0
    assert len(_losses(out)) == 3 and json.loads((out / "result.json").read_text())["steps"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only the run's files
    capsys.readouterr()
    assert main(_cli(tiny_dir, out, "--steps", "3", "--resume", "--overwrite")) == 2
    assert "give one" in capsys.readouterr().err
    assert main(_cli(tiny_dir, tmp_path / "never", "--steps", "3", "--resume")) == 2
    assert "no resumable state" in capsys.readouterr().err


def test_default_run_folders_are_distinct(tiny_dir, tmp_path, monkeypatch, capsys):
    """Without --out-dir each run gets runs/<config>-<date>-<time>: two runs never collide."""
    monkeypatch.chdir(tmp_path)
    assert TrainConfig().out_dir == ""
    assert main(_cli(tiny_dir, None, "--steps", "1")) == 0
    assert main(_cli(tiny_dir, None, "--steps", "1")) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("tiny-") for r in runs)
    assert all((r / "model.safetensors").is_file() for r in runs)
    first = default_out_dir("tiny", tmp_path / "x")
    first.mkdir(parents=True)
    assert default_out_dir("tiny", tmp_path / "x") != first


# -- bad values, contradictions, missing weights: one line each --------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "-5"], "train.steps (--steps) must be at least 1, got -5"),
        (["--batch-size", "0"], "train.batch_size (--batch-size) must be at least 1, got 0"),
        (["--batch-size", "-3"], "train.batch_size (--batch-size) must be at least 1, got -3"),
        (["--grad-accum", "0"], "train.grad_accum (--grad-accum) must be at least 1, got 0"),
        (["--precision", "fp8"], "train.precision (--precision) must be one of ('auto', 'fp32', 'bf16')"),
        (["--set", "train.steps=-5"], "train.steps (--steps) must be at least 1, got -5"),
        (["--set", "eval.beams=0"], "eval.beams must be at least 1, got 0"),
        (["--set", "vision.heads=0"], "field vision.heads must be at least 1, got 0"),
        (["--set", "language.heads=3"], "field language.heads (3) must divide language.width (32)"),
        (["--set", "language.vocab_size=64"], "has 89 tokens but language.vocab_size is 64"),
        (["--steps", "3", "--set", "train.steps=5"], "--steps 3 and --set train.steps=5 disagree"),
        (["--fraction", "0.5"], "--fraction 0.5 and --set data.fraction=0.02 are the same setting"),
        (["--gradient-checkpointing", "maybe"], None),
        (["--set", 'data.options={annotations="a.json"}'], "dataset 'easyvqa': unknown option(s) ['annotations']"),
        (["--set", 'data.dataset="coco_captions"'], "dataset 'coco_captions': missing option(s) ['annotations']"),
        (["--set", 'vision.pretrained="nobody/no-such-model"'], "vision.pretrained = 'nobody/no-such-model': hub id"),
        (["--set", "experts=[\"depth\"]"], "expert 'depth': weights missing"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_errors(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    if message is None:  # argparse's own error for a bad flag value
        with pytest.raises(SystemExit) as e:
            main(_cli(tiny_dir, out, *extra))
        assert e.value.code == 2 and "expected true or false" in capsys.readouterr().err
        return
    steps = [] if any("steps" in x for x in extra) else ["--steps", "2"]
    assert main(_cli(tiny_dir, out, *steps, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prismkit: error:") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not out.exists()  # refused before the run folder was made


def test_missing_weights_name_the_fix():
    """A config whose backbones are on the hub (offline here) fails before loading, naming each
    missing source and how to get it (not a Hugging Face OSError)."""
    import prismkit
    from prismkit.core.config import ConfigError

    with pytest.raises(ConfigError) as e:
        prismkit.create_model("prismer_base", pretrained=True)
    msg = str(e.value)
    assert "vision.pretrained = 'openai/clip-vit-base-patch16'" in msg
    assert "language.pretrained = 'FacebookAI/roberta-base'" in msg
    assert "huggingface-cli download" in msg and "\n" not in msg


# -- bad samples: all reported before step 0 ---------------------------------------------------
@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    for i, p in enumerate(sorted(easy_vqa.get_train_image_paths().values())[:6]):
        shutil.copy(p, root / f"img{i}.png")
    return root


def _coco(root: Path, annotations: list, name: str = "captions.json") -> Path:
    images = [{"id": i, "file_name": f"img{i}.png"} for i in range(6)]
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_bad_entries_are_all_named_by_file_and_index(tiny_dir, coco_dir, tmp_path, capsys):
    """Missing keys and wrong types (a KeyError/TypeError before), a missing image and an empty
    caption: every one reported at once, by file and index, and nothing written."""
    anns = [{"image_id": i, "caption": "a red circle"} for i in range(6)]
    anns += [
        {"image_id": 1},  # [6] no caption
        {"image_id": 2, "caption": 5},  # [7] wrong type
        {"caption": "a shape"},  # [8] no image_id
        {"image_id": 3, "caption": "   "},  # [9] empty
        {"image_id": 99, "caption": "a shape"},  # [10] unknown image
        "not an object",  # [11]
    ]
    path = _coco(coco_dir, anns, "structure.json")
    (coco_dir / "img5.png").rename(coco_dir / "moved.png")
    try:
        opts = f'data.options={{annotations="{path}", image_root="{coco_dir}"}}'
        out = tmp_path / "run"
        code = main(_cli(tiny_dir, out, "--steps", "2", "--set", 'data.dataset="coco_captions"', "--set", opts, "--set", "data.fraction=1.0"))  # fmt: skip
    finally:
        (coco_dir / "moved.png").rename(coco_dir / "img5.png")
    assert code == 2
    err = capsys.readouterr().err
    assert "7 bad entries in" in err
    for expected in [
        f"{path} annotations[6]: missing key 'caption'",
        f"{path} annotations[7]: 'caption' must be a string, got int 5",
        f"{path} annotations[8]: missing key 'image_id'",
        f"{path} annotations[9]: empty caption for image img3.png",
        f"{path} annotations[10]: image_id 99 is not in 'images'",
        f"{path} annotations[11]: expected an object, got str 'not an object'",
        f"names image {coco_dir / 'img5.png'}, which does not exist",
    ]:
        assert expected in err, err
    assert not out.exists()


def test_bad_samples_fail_before_step_0(tiny_dir, coco_dir, tmp_path, capsys):
    """A 500-word caption (failed at step 11 before, naming nothing), an unreadable image and
    labels missing from the label store: all listed, by file and index, before step 0."""
    from prismkit.experts.edges import CannyEdges
    from prismkit.labels.runner import run_experts
    from prismkit.labels.store import LabelStore

    root = tmp_path / "images"
    shutil.copytree(coco_dir, root)
    (root / "img4.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("RGB", (16, 16)).save(root / "img5.png")  # not labelled
    store = LabelStore(tmp_path / "labels")
    run_experts([root / f"img{i}.png" for i in range(4)], {"edge": CannyEdges()}, store)
    anns = [{"image_id": i, "caption": "a red circle"} for i in range(6)]
    anns[2]["caption"] = " ".join(["word"] * 500)
    path = _coco(root, anns)
    out = tmp_path / "run"
    sets = ['data.dataset="coco_captions"', f'data.options={{annotations="{path}", image_root="{root}"}}', f'data.labels="{store.root}"', "data.fraction=1.0"]  # fmt: skip
    code = main(_cli(tiny_dir, out, "--steps", "20", *[a for s in sets for a in ("--set", s)]))
    assert code == 2
    err = capsys.readouterr().err
    assert "3 bad entries in dataset 'coco_captions' (6 samples)" in err
    assert f"sample 2 ({path} annotations[2]): prompt + target is" in err
    assert "the model takes at most 24 (max_text_len)" in err
    assert f"sample 4 ({path} annotations[4]): image {root / 'img4.png'}: cannot be read" in err
    assert f"sample 5 ({path} annotations[5]): label store {store.root} has no edge labels" in err
    assert "prismkit experts run" in err
    assert not out.exists()  # nothing written: no step ran


def test_validation_modes(tiny_dir, coco_dir, tmp_path):
    """'header' opens headers only (a truncated pixel stream passes), 'full' decodes."""
    from prismkit.core.data import DataError
    from prismkit.core.processor import Processor
    from prismkit.datasets.readers import CocoCaptions
    from prismkit.engine.validate import text_lengths, validate_dataset

    root = tmp_path / "images"
    shutil.copytree(coco_dir, root)
    raw = (root / "img1.png").read_bytes()
    (root / "img1.png").write_bytes(raw[: len(raw) // 2])
    data = CocoCaptions(
        annotations=str(
            _coco(root, [{"image_id": i, "caption": "a red circle"} for i in range(6)])
        ),
        image_root=str(root),
    )
    proc = Processor.from_config(tiny_config(tiny_dir))
    validate_dataset(data, proc, images="header")
    validate_dataset(data, proc, images="off")
    with pytest.raises(DataError, match=r"sample 1 \(.*annotations\[1\]\): image .*img1.png"):
        validate_dataset(data, proc, images="full")
    enc = proc.encode(["question: what color?", ""], ["red", "a red circle"])
    assert (
        text_lengths(proc, ["question: what color?", ""], ["red", "a red circle"])
        == enc["attention_mask"].sum(1).tolist()
    )


# -- logging, saving, stopping ---------------------------------------------------------------
def _run(out: Path, steps: int = 6, **kw) -> RunConfig:
    t = TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup=2, log_every=100, eval_questions=0, out_dir=str(out), **kw)  # fmt: skip
    return RunConfig(data=DataConfig(dataset="easyvqa", fraction=0.05), train=t)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_a_resumable_state(host, tiny_dir, tmp_path, monkeypatch, sig):
    """The signal arrives in step 2: the step finishes, a state is saved, the run says it was
    interrupted; --resume then ends bit-identical to an uninterrupted run."""
    cfg = tiny_config(tiny_dir)
    full = train(cfg, _run(tmp_path / "full"), host)
    real = train_mod.lr_at
    sent = []

    def lr_at(step, c, *rest):
        if step == 2 and not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return real(step, c, *rest)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    before = signal.getsignal(sig)  # SIG_IGN for SIGINT in a shell's background job
    part = train(cfg, _run(tmp_path / "part"), host)
    monkeypatch.setattr(train_mod, "lr_at", real)
    assert part["interrupted"] == sig.name and part["steps"] == 3
    assert json.loads((tmp_path / "part" / "last" / "state.json").read_text())["step"] == 3
    assert (
        len(_losses(tmp_path / "part")) == 3
        and not (tmp_path / "part" / "model.safetensors").exists()
    )
    assert signal.getsignal(sig) is before  # the handler restored
    resumed = train(cfg, _run(tmp_path / "part"), host, resume=True)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    assert resumed["final_loss"] == full["final_loss"]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_keeps_its_log_and_last_save(tiny_dir, tmp_path):
    """kill -9 mid-run: log.jsonl already holds every finished step (appended and flushed as it
    happens), last/ holds the latest cadence save; --resume finishes bit-identical."""
    out, ref = tmp_path / "killed", tmp_path / "ref"
    script = tmp_path / "slow_train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from prismkit.core.cli import main
            from prismkit.engine import train

            real = train.lr_at
            train.lr_at = lambda step, cfg, *rest: (time.sleep(0.3), real(step, cfg, *rest))[1]
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    args = _cli(tiny_dir, out, "--steps", "16", "--save-every", "3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    log = out / "log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(log.read_text().splitlines())
    saved = json.loads((out / "last" / "state.json").read_text())["step"]
    assert 5 <= logged < 16 and saved % 3 == 0 and logged - 3 <= saved <= logged
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process ran: the same float reductions
    try:
        assert main(_cli(tiny_dir, out, "--steps", "16", "--save-every", "3", "--resume")) == 0
        assert main(_cli(tiny_dir, ref, "--steps", "16", "--save-every", "3")) == 0
    finally:
        torch.set_num_threads(threads)
    assert _losses(out) == _losses(ref) and len(_losses(out)) == 16
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_save_cadence():
    assert TrainConfig().save_every == 100
    run = RunConfig()
    run.train.save_every = -1
    from prismkit.core.config import ConfigError

    with pytest.raises(ConfigError, match="train.save_every"):
        run.check()
