"""Configs from TOML, the command line, and an end-to-end smoke run of `prismkit train`."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_cli_sets

from prismkit.core.cli import main
from prismkit.core.config import ConfigError, load_config
from prismkit.core.host import get_plugin_manager


@pytest.mark.parametrize("name", get_plugin_manager().model_configs.names())
def test_every_registered_config_describes_on_meta(name, capsys):
    """Full-size configs too: the meta device allocates nothing and nothing is downloaded."""
    assert main(["describe", name]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "total" in out


def test_describe_base_counts(capsys):
    main(["describe", "prismer_base"])
    out = capsys.readouterr().out
    assert "1176 expert tokens -> resampler perceiver -> 64" in out
    main(["describe", "prismerz_base"])
    assert "PrismerZ (RGB only)" in capsys.readouterr().out


def test_config_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[vision]\nwidth = "wide"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: field vision.width must be int"):
        load_config(bad)
    bad.write_text("[vision]\nwidht = 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['vision.widht'\]"):
        load_config(bad)
    bad.write_text("[vision\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_overrides(tmp_path):
    host = get_plugin_manager()
    cfg = load_config(
        host.model_configs.get("prismer_base"),
        ["vision.image_size=480", "experts=[]", 'language.pretrained="/x"'],
    )
    assert cfg.vision.image_size == 480 and cfg.is_prismerz and cfg.language.pretrained == "/x"


def test_cli_errors_are_one_clear_line(capsys):
    assert main(["describe", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'no_such_config'" in err and "prismer_base" in err


def test_train_smoke_end_to_end(tiny_dir, tmp_path, capsys):
    """The real entry point for a few steps on easy-vqa: loss goes down, a checkpoint is written
    and loads back."""
    from prismkit.core.checkpoint import load_checkpoint

    out_dir = tmp_path / "run"
    args = [
        "train",
        "tiny",
        *tiny_cli_sets(tiny_dir),
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--log-every",
        "4",
        "--eval-questions",
        "16",
        "--out-dir",
        str(out_dir),
    ]
    assert main(args) == 0
    result = json.loads((out_dir / "result.json").read_text())
    assert result["final_loss"] < result["first_loss"]
    assert 0.0 <= result["eval"]["vqa_accuracy"] <= 1.0 and result["eval"]["samples"] == 16
    assert len((out_dir / "log.jsonl").read_text().splitlines()) == 12
    model = load_checkpoint(out_dir / "model.safetensors")
    assert model.config.name == "tiny"
    assert "step     0" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_offline_default(tmp_path, capsys):
    """The README's main job, shrunk: both variants train side by side (two processes),
    evaluate and report."""
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--eval-questions",
                "4",
                "--jobs",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert {r["variant"] for r in report["runs"]} == {"Prismer", "PrismerZ"}
    for r in report["runs"]:
        assert {"easyvqa/vqa_accuracy", "easyvqa_captions/cider"} <= set(r["eval"])
        assert (out / f"{r['config']}-f1-s0" / "curves.png").exists()
        assert "step     0" in (out / f"{r['config']}-f1-s0.log").read_text()
        assert r["peak_rss_mib"] > 100  # torch alone is more than that
    assert (out / "gallery.png").exists()
    assert "VQA acc" in capsys.readouterr().out


def test_passthrough_commands_show_their_own_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
