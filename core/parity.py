"""Recompute a Prismer reference fixture with prismkit (``prismkit convert prismer --fixture``).

A fixture folder (made by running the official NVlabs/prismer code; see its ``FORMAT.md``) holds
the reference model's weights under the reference's key names (``weights.safetensors``), its
dimensions (``config.json``) and the model inputs (``inputs.safetensors``). :func:`run_fixture`
reads only those, converts the weights through :func:`prismkit.core.convert.prismer_key_map`,
and computes every output the format describes, under the same names and shapes, so that they
can be compared with the fixture's ``outputs.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from prismkit.core.convert import ConversionError, Heads, build_converted, infer_config
from prismkit.core.generation import BeamConfig, beam_search, rank_answers
from prismkit.core.heads import IGNORE, sequence_losses
from prismkit.core.host import PluginHost
from prismkit.core.model import PrismerModel, SemanticInput


def load_fixture_weights(folder: Path) -> dict[str, Tensor]:
    """``weights.safetensors`` as float32 with its tied aliases restored (``tied_aliases`` in the
    safetensors metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / "weights.safetensors"
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    with safe_open(str(path), "pt") as f:
        tied = json.loads((f.metadata() or {}).get("tied_aliases", "{}"))
    for alias, source in tied.items():
        sd[alias] = sd[source]
    return sd


def _semantic(index_u8: Tensor, rows: Tensor, background: Tensor) -> SemanticInput:
    """A reference label map (values 0..K-1 rows of ``rows (B, K, C)`` per sample, 255 =
    background) as prismkit's SemanticInput (index 0 = background)."""
    b, k, _ = rows.shape
    idx = index_u8[:, 0].long()
    local = torch.where(idx == 255, torch.zeros_like(idx), idx + 1)
    offset = torch.arange(b).view(b, 1, 1) * k
    index = torch.where(local == 0, local, local + offset)
    table = torch.cat([background[None], rows.reshape(b * k, -1)])
    return SemanticInput(index, table, instances=local)


def fixture_inputs(folder: Path, model: PrismerModel) -> tuple[Tensor, dict, Tensor | None]:
    """Images in [0, 1], the experts' inputs as prismkit takes them, and the instance rows."""
    from safetensors.torch import load_file

    x = load_file(str(folder / "inputs.safetensors"))
    images = x["rgb_u8"].float() / 255
    background = x.get("table.background_feature")
    experts: dict = {}
    rows = None
    for slot in model.experts:
        n = slot.name
        if slot.kind == "dense":
            experts[n] = x[f"{n}_u8"].float() / 255
        elif f"{n}.label_map" in x:  # a closed-vocabulary segmentation map
            table = x[f"table.{n.removeprefix('seg_')}_features"]
            b = x[f"{n}.label_map"].shape[0]
            experts[n] = _semantic(x[f"{n}.label_map"], table[None].expand(b, -1, -1), background)
        elif f"{n}.instance_map" in x:  # detection: instance ids and their categories
            cats = x[f"{n}.instance_category"]
            table = x["table.detection_features"]
            per = table[cats.clamp(min=0)] * (cats >= 0)[..., None]
            experts[n] = _semantic(x[f"{n}.instance_map"], per, background)
            rows = x[f"{n}.instance_embedding_rows"]
        elif f"{n}.word_map" in x:  # OCR: per-sample word features
            experts[n] = _semantic(x[f"{n}.word_map"], x[f"{n}.word_features"], background)
        else:
            raise ConversionError(f"the fixture has no inputs for expert {n!r}")
    return images, experts, rows


@torch.no_grad()
def run_fixture(folder: str | Path, host: PluginHost | None = None) -> dict[str, Tensor]:
    """Every output named in the fixture's FORMAT.md, computed by prismkit."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    vit, rob, res = cfg["vit"], cfg["roberta"], cfg.get("resampler", {})
    heads = Heads(vit["heads"], rob["num_attention_heads"], res.get("heads", 8))
    state = load_fixture_weights(folder)
    config = infer_config(
        state,
        name=cfg.get("fixture", "fixture"),
        heads=heads,
        image_size=vit["image_resolution"],
        seg_expert=next(
            (e for e in cfg["model_config"]["experts"] if e.startswith("seg")), "seg_coco"
        ),
        eps=rob["layer_norm_eps"],
        experts=cfg["model_config"]["experts"],
    )
    config.language.dropout = rob.get("hidden_dropout_prob", 0.1)
    config.language.attention_dropout = rob.get("attention_probs_dropout_prob", 0.1)
    model = build_converted(state, config, host).eval()
    smoothing = cfg["roberta_structure"].get("label_smoothing", 0.1)
    x = load_file(str(folder / "inputs.safetensors"))
    images, experts, rows = fixture_inputs(folder, model)
    out: dict[str, Tensor] = {}
    trace: dict[str, Tensor] = {}
    vision = model.encode_image(images, experts, instance_rows=rows, trace=trace)
    if "resampler_in" in trace:
        out["encoder.resampler_in"] = trace["resampler_in"]
        out["encoder.resampler_out"] = trace["resampler_out"]
    out["encoder.ln_pre_in"] = trace["ln_pre_in"]
    out["encoder.out"] = vision
    lang = model.language
    pad = lang.pad_token_id

    # captions with teacher forcing
    ids, mask = x["caption.input_ids"], x["caption.attention_mask"]
    hidden, _ = lang(ids, vision, mask)
    logits = lang.logits(hidden).float()
    out["caption.decoder_hidden"] = hidden
    out["caption.logits_subset"] = logits[..., x["caption.logits_ids"]]
    out["caption.logits_logsumexp"] = logits.logsumexp(-1)
    out["caption.logits_max"], out["caption.logits_argmax"] = logits.max(-1)
    base = ids.masked_fill(ids == pad, IGNORE)
    for suffix, prompt_len in (("", 1 + len(x["caption.prompt_ids"])), ("_noprefix", 0)):
        labels = base.clone()
        labels[:, :prompt_len] = IGNORE
        per = sequence_losses(hidden, labels, lang.logits, smoothing)
        out[f"caption.labels{suffix}"] = labels
        out[f"caption.loss_per_sample{suffix}"] = per
        out[f"caption.loss{suffix}"] = per.mean()

    # caption generation
    g = cfg["generation"]["caption"]
    beam = beam_search(
        lang,
        vision,
        x["generate.input_ids"],
        x["generate.attention_mask"],
        g["eos_token_id"],
        g["pad_token_id"],
        BeamConfig(
            beams=g["num_beams"],
            max_length=g["max_length"],
            min_length=g["min_length"],
            length_penalty=g["length_penalty"],
        ),
    )
    out["generate.ids"], out["generate.sequence_scores"] = beam.sequences, beam.scores

    # VQA: training loss, first-token logits, ranking, generation
    q, qm = x["vqa.question_ids"], x["vqa.question_attention_mask"]
    ta, tam = x["vqa.train.answer_ids"], x["vqa.train.answer_attention_mask"]
    ids = torch.cat([q, ta], dim=1)
    labels = ids.masked_fill(ids == pad, IGNORE)
    labels[:, : q.shape[1]] = IGNORE
    hidden, _ = lang(ids, vision, torch.cat([qm, tam], dim=1))
    per = sequence_losses(hidden, labels, lang.logits, smoothing)
    out["vqa.train.labels"], out["vqa.train.loss_per_sample"] = labels, per
    out["vqa.train.loss"] = (x["vqa.train.weights"] * per).mean()
    a, am = x["vqa.answer_ids"], x["vqa.answer_attention_mask"]
    hidden, _ = lang(q, vision, qm)
    last = lang.logits(hidden[:, -1]).float()
    out["vqa.start.answer_first_token_logits"] = last[:, a[:, 0]]
    out["vqa.start.logsumexp"] = last.logsumexp(-1)
    for k in cfg["vqa"]["k_tests"]:
        r = rank_answers(lang, vision, q, qm, a, am, k, smoothing)
        for name in (
            "first_token_probs",
            "topk_ids",
            "input_ids",
            "attention_mask",
            "labels",
            "loss_per_sequence",
            "scores",
            "answer_index",
        ):
            out[f"vqa.rank.k{k}.{name}"] = getattr(r, name)
    g = cfg["generation"]["vqa"]
    beam = beam_search(
        lang,
        vision,
        q,
        qm,
        cfg["generation"]["caption"]["eos_token_id"],
        cfg["generation"]["caption"]["pad_token_id"],
        BeamConfig(
            beams=g["num_beams"],
            max_length=g["max_length"],
            min_length=g["min_length"],
            length_penalty=g["length_penalty"],
        ),
    )
    out["vqa.generate.ids"], out["vqa.generate.sequence_scores"] = beam.sequences, beam.scores
    return {k: v.detach().contiguous() for k, v in out.items()}
