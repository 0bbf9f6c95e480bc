"""Checkpoints: trainable weights + config + plugin versions; loading restores the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import batch_for, tiny_config
from safetensors.torch import load_file

from prismkit.core.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from prismkit.core.io import atomic_write
from prismkit.core.model import create_model


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(**batch_for(model))  # moves BatchNorm running statistics of the expert stems
    return model.eval()


@pytest.mark.parametrize("pretrained_backbones", [True, False])
def test_round_trip_gives_identical_outputs(host, tiny_dir, tmp_path, pretrained_backbones):
    cfg = tiny_config(tiny_dir)
    if not pretrained_backbones:  # random backbones: their frozen weights travel in the checkpoint
        cfg.vision.pretrained = None
    model = _perturb(create_model(cfg, host))
    path = tmp_path / "ckpt" / "model.safetensors"
    save_checkpoint(model, path, host, extra={"step": 7})
    meta = read_metadata(path)
    assert meta["config"]["name"] == "tiny" and meta["extra"] == {"step": 7}
    assert meta["plugins"]["vision"]["distribution"] == "prismkit"
    restored = load_checkpoint(path, host).eval()
    batch = batch_for(model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).loss, model(**batch).loss)
    stored = set(load_file(str(path)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= stored
    if pretrained_backbones:  # frozen pretrained weights are not duplicated into the checkpoint
        assert "language.layers.0.fc1.weight" not in stored
        assert "vision.layers.0.self_attn.q_proj.weight" not in stored
    else:
        assert "vision.layers.0.self_attn.q_proj.weight" in stored


def test_checkpoint_of_another_model_is_refused(host, tiny_dir, tmp_path):
    from prismkit.core.checkpoint import load_weights

    path = tmp_path / "z.safetensors"
    save_checkpoint(create_model(tiny_config(tiny_dir, "tiny_z"), host), path, host)
    with pytest.raises(ValueError, match="does not fit this model: .*missing \\['expert_stems"):
        load_weights(create_model(tiny_config(tiny_dir), host), path)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_metadata(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metadata(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_retired_config_field_of_an_older_checkpoint_is_dropped_with_a_warning(
    host, tiny_dir, tmp_path
):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_checkpoint(create_model(tiny_config(tiny_dir, "tiny_z"), host), path, host)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["stem_channels"] = 32  # written by prismkit 0.1
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**meta, "config": json.dumps(config)})
    with pytest.warns(UserWarning, match="'stem_channels' dropped"):
        model = load_checkpoint(old, host)
    assert model.config.name == "tiny_z"
