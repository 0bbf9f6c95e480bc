"""BLIP training through the engine: resume continues the same curve (queues, pointers, momentum
encoders, ramps in the checkpoint), schedules count optimizer steps under gradient accumulation,
data captions are cut (never fatal) and empty ones dropped with a count, CapFilt end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TestPlugin, tiny_config
from safetensors.torch import load_file

from prismkit import hookimpl
from prismkit.blip.frozen import FrozenBLIPObjective
from prismkit.blip.model import BlipModel
from prismkit.core.config import resolve_config
from prismkit.core.data import Sample, VLDataset
from prismkit.core.host import get_plugin_manager
from prismkit.core.processor import Processor, drop_empty
from prismkit.engine.train import DataConfig, RunConfig, TrainConfig, train

LONG = "a red circle " + " ".join(["lorem ipsum dolor"] * 40)


class NoisyCaptions(VLDataset):
    """easy-vqa captions with web noise: one 120-word caption, one of whitespace."""

    name = "noisy_captions"
    task = "caption"

    def __init__(self, *, split: str = "train", **_: object) -> None:
        from prismkit.datasets.easyvqa import EasyVQACaptions

        base = EasyVQACaptions(split=split).samples[:12]
        samples = [Sample(s.image, s.image_id, s.prompt, s.target, s.references) for s in base]
        samples[3].target = LONG
        samples[5].target = "   \n "
        super().__init__(samples)


class NoisyPlugin:
    __name__ = "noisy_plugin"

    @hookimpl
    def register_datasets(self, register):
        register(NoisyCaptions)


@pytest.fixture(scope="module")
def host():
    return get_plugin_manager(extra_plugins=[TestPlugin(), NoisyPlugin()])


def _run(out: Path, dataset: str = "easyvqa_captions", **kw) -> RunConfig:
    t = dict(steps=6, batch_size=4, lr=3e-3, warmup=2, log_every=100, eval_questions=0)
    t.update(kw)
    return RunConfig(
        data=DataConfig(dataset=dataset, fraction=0.05 if dataset == "easyvqa_captions" else 1.0),
        train=TrainConfig(out_dir=str(out), **t),
    )


def _blip(host, head: str = "blip_pretrain", **options):
    cfg = resolve_config(host, "blip_tiny")
    cfg.head = head
    cfg.max_text_len = 30
    cfg.head_options.update(options)
    return cfg


def _losses(folder: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "log.jsonl").read_text().splitlines()]


# -- resume --------------------------------------------------------------------------------------
def _assert_resume_continues(cfg, host, tmp_path):
    full = train(cfg, _run(tmp_path / "full"), host)
    part = _run(tmp_path / "part")
    train(cfg, part, host, stop_after=3)  # "killed" after 3 steps
    resumed = train(cfg, part, host, resume=True)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-6)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-6, msg=k)
    return wa


@pytest.mark.parametrize("head", ["blip_pretrain", "blip_retrieval"])
def test_blip_resume_continues_the_same_curve(host, tmp_path, head):
    state = _assert_resume_continues(_blip(host, head, alpha_ramp_steps=4), host, tmp_path)
    # the training state is in the checkpoint: queues, pointer, momentum copies, counters
    assert {"image_queue", "text_queue", "queue_ptr", "step", "momentum_step"} <= set(state)
    assert int(state["step"]) == 5 and int(state["momentum_step"]) == 5
    assert int(state["queue_ptr"]) == (6 * 4) % 8
    if head == "blip_retrieval":
        assert "idx_queue" in state and int((state["idx_queue"] != -100).sum()) == 8


def test_frozen_head_resume_continues_the_same_curve(host, tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, "tiny_z", head="blip_frozen")
    cfg.head_options = {"queue_size": 8, "alpha_ramp_steps": 4}
    state = _assert_resume_continues(cfg, host, tmp_path)
    assert {"objective.image_queue", "objective.queue_ptr", "objective.steps"} <= set(state)
    assert {"objective.vision_proj_m_weight", "objective.momentum_step"} <= set(state)


# -- schedules count optimizer steps -------------------------------------------------------------
def test_blip_schedules_count_optimizer_steps(host, tmp_path, monkeypatch):
    updates, alphas = [], []
    update, alpha_at = BlipModel.momentum_update, BlipModel.alpha_at
    monkeypatch.setattr(
        BlipModel, "momentum_update", lambda self: (updates.append(int(self.step)), update(self))
    )
    monkeypatch.setattr(
        BlipModel, "alpha_at", lambda self, s: (alphas.append(s), alpha_at(self, s))[1]
    )
    cfg = _blip(host, alpha_ramp_steps=2)
    train(cfg, _run(tmp_path, steps=3, grad_accum=2), host)
    assert updates == [0, 1, 2]  # m once per optimizer step, not m^2
    assert alphas == [0, 0, 1, 1, 2, 2]  # the ramp by optimizer steps


def test_frozen_head_schedules_count_optimizer_steps(host, tiny_dir, tmp_path, monkeypatch):
    updates, alphas = [], []
    update, current = FrozenBLIPObjective.momentum_update, FrozenBLIPObjective.current_alpha
    monkeypatch.setattr(
        FrozenBLIPObjective,
        "momentum_update",
        lambda self: (updates.append(int(self.steps)), update(self)),
    )
    monkeypatch.setattr(
        FrozenBLIPObjective,
        "current_alpha",
        lambda self: (alphas.append(int(self.steps)), current(self))[1],
    )
    cfg = tiny_config(tiny_dir, "tiny_z", head="blip_frozen")
    cfg.head_options = {"queue_size": 8, "alpha_ramp_steps": 2}
    train(cfg, _run(tmp_path, steps=3, grad_accum=2), host)
    assert updates == [0, 1, 2]
    assert alphas == [0, 0, 1, 1, 2, 2]


# -- data captions: cut, empty ones dropped and counted ----------------------------------------
def test_processor_cuts_data_captions_and_refuses_typed_text(host):
    proc = Processor.from_config(_blip(host))
    with pytest.raises(ValueError, match="at most 30"):
        proc.encode([""], [LONG])  # typed text: the clear error stays
    enc = proc.encode(["a picture of"], [LONG], truncate=True)
    ids, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
    assert len(ids) == 30 and ids[0] == 101 and ids[-1] == 102  # [SEP] kept, as BERT truncation
    assert ids[1:4] == proc.tokenizer("a picture of", add_special_tokens=False)["input_ids"]
    assert labels[:4] == [-100] * 4 and labels[4:] == ids[4:]
    assert proc.encode([""], [LONG], truncate=True, max_len=35)["input_ids"].shape == (1, 35)
    with pytest.raises(ValueError, match="drop_empty"):
        proc.encode([""], ["  "], truncate=True)
    assert drop_empty(["a", " \n", "", "b"]) == ([0, 3], 2)


def test_training_on_raw_captions_does_not_crash(host, tmp_path):
    result = train(_blip(host), _run(tmp_path, "noisy_captions", steps=3), host)
    assert result["dropped_empty_targets"] == 1
    assert torch.isfinite(torch.tensor(result["final_loss"]))


def _pairs_file(path: Path, captions: list[str]) -> Path:
    import easy_vqa

    images = list(easy_vqa.get_train_image_paths().values())
    path.write_text(
        "".join(
            json.dumps({"image": images[i], "caption": c}) + "\n" for i, c in enumerate(captions)
        )
    )
    return path


def test_retrieval_on_raw_captions(host, tmp_path):
    from prismkit.blip.runs import retrieval_on_pairs
    from prismkit.core.checkpoint import save_checkpoint
    from prismkit.core.model import create_model

    ckpt = tmp_path / "r.safetensors"
    save_checkpoint(create_model(_blip(host, "blip_retrieval"), host, pretrained=False), ckpt, host)
    data = _pairs_file(tmp_path / "d.jsonl", ["a red circle", LONG, " ", "a blue square"])
    metrics, info = retrieval_on_pairs(ckpt, data, host, k_test=2)
    assert info == {"images": 3, "texts": 3, "empty": 1, "k_test": 2}
    assert metrics["txt_r5"] == 100.0


# -- CapFilt -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(host, tmp_path_factory) -> Path:
    from prismkit.core.checkpoint import save_checkpoint
    from prismkit.core.model import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pre") / "pre.safetensors"
    save_checkpoint(create_model(_blip(host), host, pretrained=False), path, host)
    return path


def test_capfilt_refuses_one_model_as_both(host, pretrained, tmp_path):
    from prismkit.blip.capfilt import capfilt

    web = _pairs_file(tmp_path / "web.jsonl", ["a red circle"])
    copy = tmp_path / "copy.safetensors"
    shutil.copy(pretrained, copy)
    for filt in (pretrained, copy):
        with pytest.raises(ValueError, match="same checkpoint"):
            capfilt(web, tmp_path / "out", host, captioner=pretrained, filt=filt)


def test_capfilt_end_to_end(host, pretrained, tmp_path, capsys):
    from prismkit.core.cli import main

    human = _pairs_file(tmp_path / "human.jsonl", ["a red circle"] * 6)
    web_caps = ["a blue square", "", LONG, "a green triangle", "!!", "a gray circle"]
    web = tmp_path / "web.jsonl"
    import easy_vqa

    images = list(easy_vqa.get_train_image_paths().values())[6:12]
    web.write_text(
        "".join(
            json.dumps({"image": p, "caption": c}) + "\n"
            for p, c in zip(images, web_caps, strict=True)
        )
    )
    out = tmp_path / "cf"
    args = [
        "capfilt", str(web), "--human", str(human), "--init", str(pretrained), "--out", str(out),
        "--steps", "2", "--batch-size", "4", "--max-length", "10", "--min-length", "6",
        "--threshold", "0.0",
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "capfilt.json").read_text())
    assert report["web_empty"] == 2 and report["web_kept"] + report["web_dropped"] == 4
    assert report["synthetic_kept"] + report["synthetic_dropped"] + report["synthetic_empty"] == 6
    rows = [json.loads(x) for x in (out / "bootstrapped.jsonl").read_text().splitlines()]
    assert len(rows) == 6 + report["web_kept"] + report["synthetic_kept"]
    assert [r["source"] for r in rows[:6]] == ["human"] * 6
    assert all(r["itm_score"] is not None for r in rows[6:])
    # the two fine-tuned models are separate runs, started from the same pre-trained model
    cap = load_file(str(out / "blip_caption" / "model.safetensors"))
    filt = load_file(str(out / "blip_retrieval" / "model.safetensors"))
    assert "lm_head.bias" in cap and "itm_head.weight" in filt and "itm_head.weight" not in cap
    assert main(args) == 2  # never overwrites a finished run
    assert "exists" in capsys.readouterr().err
