"""The embedded run's plan (`prismkit demo`): which runs, where, reading which labels."""

from __future__ import annotations

import pytest

from prismkit.core.host import get_plugin_manager
from prismkit.engine import demo


def test_ablation_plan_runs_the_baseline_first_and_reads_labels_only_with_experts(tmp_path):
    args = demo.build_parser().parse_args(
        ["--out", str(tmp_path), "--experts", "edge", "seg_superpixel"]
        + ["--seeds", "0", "1", "--fractions", "1", "0.1"]
    )
    runs = demo.plan(args, get_plugin_manager(), tmp_path)
    assert len(runs) == 2 * 2 * 3
    assert [r.variant.label for r in runs[:3]] == [
        "PrismerZ",
        "Prismer[edge]",
        "Prismer[seg_superpixel]",
    ]
    assert len({r.run_dir for r in runs}) == len(runs)
    for r in runs:
        assert r.model_cfg.experts == list(r.variant.experts or [])
        assert r.run.data.labels == (str(tmp_path / "labels") if r.model_cfg.experts else "")
        assert r.run.train.seed == r.seed and r.run.data.fraction == r.fraction
        assert r.model_cfg.vision.image_size == 64 and r.model_cfg.language.dropout == 0.0
    assert runs[4].run_dir.name == "offline_default-edge-f1-s1"


def test_demo_refuses_no_jobs_and_folders_it_did_not_write(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--jobs 0"):
        demo.main(["--out", str(tmp_path), "--jobs", "0"])
    (tmp_path / "offline_default_z-f1-s0").mkdir()
    (tmp_path / "offline_default_z-f1-s0" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds another or an unfinished run"):
        demo.main(["--out", str(tmp_path), "--steps", "1"])
    assert (tmp_path / "offline_default_z-f1-s0" / "notes.txt").read_text() == "mine"
