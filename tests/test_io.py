"""Atomic writes keep the umask (not mkstemp's 0600) and leave no stray temporary files for
good: checkpoints, label-store files and reports are as readable as any file the user writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from prismkit.core.checkpoint import save_checkpoint
from prismkit.core.expert import LabelMap
from prismkit.core.io import atomic_write, file_mode, remove_stale_temporaries
from prismkit.core.model import create_model
from prismkit.experts.edges import CannyEdges
from prismkit.labels.store import LabelStore


@pytest.fixture
def umask():
    """Set a umask for the test; the old one is restored."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "want"), [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    assert file_mode() == want
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    atomic_write(tmp_path / "b.bin", lambda tmp: os.replace(_other(tmp_path), tmp))
    assert _mode(tmp_path / "a.txt") == want
    assert _mode(tmp_path / "b.bin") == want  # a writer that replaces the temporary file too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def _other(folder: Path) -> Path:
    p = folder / "other"
    p.write_bytes(b"y")
    os.chmod(p, 0o600)
    return p


def test_checkpoints_label_files_and_reports_are_shared(host, tiny_dir, tmp_path, umask):
    """Under a group-writable umask (a shared folder), everything prismkit writes is 0664."""
    umask(0o002)
    model = create_model(tiny_config(tiny_dir), host)
    save_checkpoint(model, tmp_path / "ckpt.safetensors", host)
    store = LabelStore(tmp_path / "labels")
    label = store.put_key("ab" * 32, CannyEdges, LabelMap(torch.zeros(1, 1, 4, 4)))
    from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train

    run = RunConfig(
        data=DataConfig(dataset="easyvqa", fraction=0.01),
        train=TrainConfig(steps=1, batch_size=2, eval_questions=0, out_dir=str(tmp_path / "run")),
    )
    train(tiny_config(tiny_dir), run, host)
    written = [tmp_path / "ckpt.safetensors", label]
    written += [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"model.safetensors", "result.json", "log.jsonl", "curves.png", "state.json"} <= {
        p.name for p in written
    }
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: "0o664" for p in written}


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)  # fmt: skip
    pid = int(dead.stdout)
    from prismkit.core import io

    (tmp_path / "a" / "b").mkdir(parents=True)
    gone = tmp_path / "a" / "b" / f".x.safetensors.{io._HOST}.{pid}.k3j2.tmp"
    alive = tmp_path / "a" / f".y.safetensors.{io._HOST}.{os.getpid()}.zz.tmp"
    other_host = tmp_path / f".z.safetensors.elsewhere.{pid}.q.tmp"
    old = tmp_path / ".w.json.elsewhere.1.q.tmp"
    keep = tmp_path / "a" / "b" / "x.safetensors"
    for p in (gone, alive, other_host, old, keep):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([gone, old])
    assert alive.exists() and other_host.exists() and keep.exists()


def test_a_killed_write_leaves_the_old_file_and_its_temporary_is_cleaned(tmp_path):
    """kill -9 during a write: the target keeps its old content, the temporary file stays until
    the next cleanup, which removes it (its process is gone)."""
    target = tmp_path / "result.json"
    target.write_text(json.dumps({"old": True}))
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from prismkit.core.io import atomic_write

        def slow(tmp):
            Path(tmp).write_text('{{"new": ')
            print("writing", flush=True)
            time.sleep(60)

        atomic_write({str(target)!r}, slow)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # type: ignore[union-attr]
    proc.kill()
    proc.wait()
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and json.loads(target.read_text()) == {"old": True}
    assert remove_stale_temporaries(tmp_path) == temps
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
