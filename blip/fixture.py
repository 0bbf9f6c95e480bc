"""Reference fixtures: recompute every output a BLIP reference fixture's FORMAT.md describes
from its weights, config and inputs, through the converter and prismkit's BLIP model
(``prismkit convert blip --fixture DIR --out FILE``).

Nothing here depends on a fixture's sizes: dimensions come from ``config.json`` and the tensors.
Each output is computed with the model the reference used: BLIP_Retrieval (ITC, ITM, retrieval
evaluation, retrieval training forward), BLIP_ITM (``itm_cls``), BLIP_Decoder (captioning loss,
beam search), BLIP_Pretrain (pre-training forward); all are converted from the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from prismkit.blip import losses
from prismkit.blip.convert import from_reference, infer_config, load_converted, read_reference
from prismkit.blip.generation import GenerationConfig
from prismkit.blip.options import CAPTION, PRETRAIN, RETRIEVAL
from prismkit.blip.retrieval import METRICS, evaluate
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.io import atomic_write


def fixture_model(folder: Path, task: str, host: PluginHost, state=None):
    """The fixture's weights converted to a ``task`` model, loaded strictly, in eval mode."""
    cfg = json.loads((folder / "config.json").read_text())
    m = cfg["model"]
    state = read_reference(folder / "weights.safetensors") if state is None else state
    mapped = from_reference(state, task)
    config = infer_config(
        mapped,
        task,
        name=f"fixture_{task}",
        vision_heads=m["vit"]["heads"],
        text_heads=m["med_config"]["num_attention_heads"],
    )
    config.vision.eps = m["vit"]["layernorm_eps"]
    config.language.eps = m["med_config"]["layer_norm_eps"]
    opts = config.head_options
    opts.update(
        momentum=m["momentum"],
        prompt=m["prompt"],
        negative_all_rank=m.get("negative_all_rank", True),
        drop_path=m["vit"].get("drop_path_rate", 0.0),
        text_dropout=m["med_config"]["hidden_dropout_prob"],
    )
    config.label_smoothing = m["label_smoothing"]
    from prismkit.core.model import create_model

    model = create_model(config, host, pretrained=False)
    load_converted(model, mapped, str(folder / "weights.safetensors"))
    return model.eval()


def _logit_stats(prefix: str, logits: Tensor, ids: Tensor) -> dict[str, Tensor]:
    return {
        f"{prefix}.logits_subset": logits[..., ids],
        f"{prefix}.logits_logsumexp": torch.logsumexp(logits, dim=-1),
        f"{prefix}.logits_max": logits.max(dim=-1).values,
        f"{prefix}.logits_argmax": logits.argmax(dim=-1),
    }


@torch.no_grad()
def compute_outputs(folder: str | Path, host: PluginHost | None = None) -> dict[str, Tensor]:
    """Every output of the fixture in ``folder``, under FORMAT.md's names."""
    folder = Path(folder)
    host = host or get_plugin_manager()
    cfg = json.loads((folder / "config.json").read_text())
    x = load_file(str(folder / "inputs.safetensors"))
    state = read_reference(folder / "weights.safetensors")
    out: dict[str, Tensor] = {}
    image = x["image"].float()

    # -- BLIP_Retrieval: ViT, ITC, ITM, retrieval evaluation -----------------------------------
    r = fixture_model(folder, RETRIEVAL, host, state)
    out["vit.patch_tokens"] = r.vision.patch_tokens(image)
    embeds = r.image_embeds(image)
    out["vit.image_embeds"] = embeds
    ids, mask = x["text.input_ids"], x["text.attention_mask"]
    hidden = r.text_encoder(ids, mask)
    out["text.last_hidden_state"] = hidden
    image_feat = r.image_feat(embeds)
    text_feat = F.normalize(r.text_proj(hidden[:, 0, :]), dim=-1)
    temp = r.temp.clamp(0.001, 0.5)
    out.update(
        {
            "itc.image_feat": image_feat,
            "itc.text_feat": text_feat,
            "itc.temp": temp.detach().clone(),
            "itc.sim_i2t": image_feat @ text_feat.t() / temp,
            "itc.sim_t2i": text_feat @ image_feat.t() / temp,
        }
    )
    pi, pt = x["itm.pair_image_idx"], x["itm.pair_text_idx"]
    itm_hidden = r.text_encoder(x["itm.input_ids"], mask[pt], embeds[pi])
    itm_logits = r.itm_head(itm_hidden[:, 0, :])
    out["itm.last_hidden_state"] = itm_hidden
    out["itm.logits"] = itm_logits
    out["itm.match_prob"] = itm_logits.softmax(dim=1)[:, 1]
    rc = cfg["retrieval"]
    text_image = cfg["texts"]["text_image"]
    res = evaluate(r, image, ids, mask, text_image, k_test=rc["k_test"])
    out.update(
        {
            "retrieval.sims": res.sims,
            "retrieval.i2t_topk_idx": res.i2t_topk_idx,
            "retrieval.t2i_topk_idx": res.t2i_topk_idx,
            "retrieval.i2t_itm_logits": res.i2t_itm_logits,
            "retrieval.t2i_itm_logits": res.t2i_itm_logits,
            "retrieval.score_i2t": res.score_i2t,
            "retrieval.score_t2i": res.score_t2i,
            "retrieval.metrics": torch.tensor([res.metrics[k] for k in METRICS]),
        }
    )
    # BLIP_ITM: the ViT recomputed on the pair images, [CLS] kept (no [ENC] swap)
    out["itm_cls.logits"] = r.itm_logits(ids[pt], mask[pt], r.image_embeds(image[pi]), swap=False)

    # -- BLIP_Decoder: captioning loss and beam search -----------------------------------------
    c = fixture_model(folder, CAPTION, host, state)
    cap_ids, cap_mask = x["caption.input_ids"], x["caption.attention_mask"]
    b = cap_ids.shape[0]
    prompt_length = cfg["model"]["prompt_length"]
    labels = cap_ids.masked_fill(cap_ids == c.options.pad_token_id, losses.IGNORE)
    labels[:, :prompt_length] = losses.IGNORE
    step = c.caption_step(image[:b], cap_ids, cap_mask, labels)
    logits = c.lm_logits(step["hidden"])
    per_token = losses.lm_token_losses(logits, labels, c.config.label_smoothing)
    out.update(
        {
            "caption.image_embeds": step["image_embeds"],
            "caption.labels": labels,
            "caption.decoder_hidden": step["hidden"],
            **_logit_stats("caption", logits, x["caption.logits_ids"]),
            "caption.loss_per_token": per_token,
            "caption.loss": step["loss_lm"],
            "caption.loss_sum_per_sample": per_token.sum(1),
        }
    )
    for name in ("generate", "generate_rp"):
        call = cfg["generation"][name]["hf_call"]
        gcfg = GenerationConfig(
            num_beams=call["num_beams"],
            max_length=call["max_length"],
            min_length=call["min_length"],
            repetition_penalty=call["repetition_penalty"],
            eos_token_id=call["eos_token_id"],
            pad_token_id=call["pad_token_id"],
        )
        seq, scores = c.generate(image[:b], x["generate.input_ids"], False, gcfg)
        out[f"{name}.ids"], out[f"{name}.sequence_scores"] = seq, scores

    # -- BLIP_Pretrain: the pre-training forward (momentum update, queues, three losses) -------
    p = fixture_model(folder, PRETRAIN, host, state)
    pids, pmask = x["pretrain.input_ids"], x["pretrain.attention_mask"]
    b = pids.shape[0]
    po = p.pretrain_step(
        image[:b],
        pids,
        pmask,
        float(x["pretrain.alpha"]),
        x["pretrain.itm.neg_image_idx"],
        x["pretrain.itm.neg_text_idx"],
    )
    for k in (
        "image_embeds", "image_embeds_m", "image_feat", "text_feat", "image_feat_m",
        "text_feat_m", "sim_i2t", "sim_t2i", "sim_i2t_targets", "sim_t2i_targets", "loss_ita",
        "itm.weights_t2i", "itm.weights_i2t", "itm.pos_cls", "itm.neg_cls", "itm.logits",
        "loss_itm", "lm.input_ids", "lm.labels", "loss_lm",
    ):  # fmt: skip
        out[f"pretrain.{k}"] = po[k]
    out.update(_logit_stats("pretrain.lm", p.lm_logits(po["lm.hidden"]), x["caption.logits_ids"]))
    out.update(
        {
            "pretrain.after.image_queue": p.image_queue.clone(),
            "pretrain.after.text_queue": p.text_queue.clone(),
            "pretrain.after.queue_ptr": p.queue_ptr.clone(),
            "pretrain.after.vision_proj_m.weight": p.vision_proj_m.weight.clone(),
            "pretrain.after.text_proj_m.weight": p.text_proj_m.weight.clone(),
            "pretrain.after.temp": p.temp.detach().clone(),
        }
    )

    # -- BLIP_Retrieval's training forward ----------------------------------------------------
    t = fixture_model(folder, RETRIEVAL, host, state)
    rids, rmask = x["retrieval_train.input_ids"], x["retrieval_train.attention_mask"]
    b = rids.shape[0]
    ro = t.retrieval_step(
        image[:b],
        rids,
        rmask,
        x["retrieval_train.idx"],
        float(x["retrieval_train.alpha"]),
        x["retrieval_train.itm.neg_image_idx"],
        x["retrieval_train.itm.neg_text_idx"],
    )
    for k in (
        "image_feat", "text_feat", "image_feat_m", "text_feat_m", "sim_targets", "sim_i2t",
        "sim_t2i", "sim_i2t_targets", "sim_t2i_targets", "loss_ita", "itm.weights_t2i",
        "itm.weights_i2t", "itm.logits", "loss_itm",
    ):  # fmt: skip
        out[f"retrieval_train.{k}"] = ro[k]
    out.update(
        {
            "retrieval_train.after.image_queue": t.image_queue.clone(),
            "retrieval_train.after.text_queue": t.text_queue.clone(),
            "retrieval_train.after.idx_queue": t.idx_queue.clone(),
            "retrieval_train.after.ptr_queue": t.queue_ptr.clone(),
        }
    )
    return {
        k: (v.detach().float() if v.is_floating_point() else v.long()).contiguous().cpu()
        for k, v in out.items()
    }


def write_outputs(folder: str | Path, path: str | Path, host: PluginHost | None = None) -> int:
    """Compute a fixture's outputs and write them to ``path`` (safetensors, atomically);
    returns the number of tensors. Refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: prismkit does not overwrite; choose another --out")
    outputs = compute_outputs(folder, host)
    atomic_write(path, lambda tmp: save_file(outputs, tmp, metadata={"fixture": str(folder)}))
    return len(outputs)
