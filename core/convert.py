"""Official Prismer checkpoints (NVlabs/prismer state dicts) -> prismkit checkpoints.

:func:`prismer_key_map` renames the reference's keys to prismkit's (a pure function: packed
attention projections split into q/k/v, tied aliases checked and dropped); :func:`infer_config`
reads every dimension from the tensors (widths, depths, patch, grid, experts, vocabulary), with
the head counts following the reference's rule (width / 64) unless given; :func:`convert_prismer`
builds the model, loads the weights strictly and writes a prismkit checkpoint plus its resolved
config. Unknown or missing keys are an error that lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prismkit.core.config import ModelConfig, dump_toml
from prismkit.core.host import PluginHost, get_plugin_manager
from prismkit.core.language.decoder import HF_LAYER

# reference stem domain -> the prismkit expert it comes from ("seg" is shared by seg_* experts)
REFERENCE_EXPERTS = {
    "depth": "depth",
    "normal": "normal",
    "edge": "edge",
    "obj_detection": "obj_detection",
    "ocr_detection": "ocr_detection",
}
# the order of the reference configs' expert lists (the order of the resampler's input tokens;
# a state dict loaded from safetensors has its keys sorted, so the order is not read from it)
REFERENCE_ORDER = ("depth", "normal", "seg", "edge", "obj_detection", "ocr_detection")
# the tokenizer of each RoBERTa width the reference uses
ROBERTA_TOKENIZERS = {768: "FacebookAI/roberta-base", 1024: "FacebookAI/roberta-large"}
# resolutions the reference trains at (pre-training 224, fine-tuning 480): a grid that one of
# them gives is taken as that size (480 px at patch 14 gives a 34 x 34 grid, like 476 px)
REFERENCE_SIZES = (224, 480, 384, 336)

_VIT_BLOCK = {
    "0.attn.out_proj": "self_attn.out_proj",
    "0.mlp.c_fc": "mlp.fc1",
    "0.mlp.c_proj": "mlp.fc2",
    "0.ln_1": "layer_norm1",
    "0.ln_2": "layer_norm2",
    "1.adaptor.down_proj": "adaptor.down",
    "1.adaptor.up_proj": "adaptor.up",
    "1.adaptor_ln": "adaptor.norm",
}
_RESAMPLER_BLOCK = {
    "attn.out_proj": "attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "norm_latents",
    "ln_2": "norm_tokens",
    "ln_ff": "norm_mlp",
}
_CROSS = {
    "self.query": "cross_attn.q_proj",
    "self.key": "cross_attn.k_proj",
    "self.value": "cross_attn.v_proj",
    "output.dense": "cross_attn.out_proj",
    "output.LayerNorm": "cross_norm",
}
_LM_ADAPTOR = {
    "adaptor.down_proj": "adaptor.down",
    "adaptor.up_proj": "adaptor.up",
    "adaptor_ln": "adaptor.norm",
}
_EMBEDDINGS = {
    "word_embeddings": "word_embeddings",
    "position_embeddings": "position_embeddings",
    "token_type_embeddings": "token_type_embeddings",
    "LayerNorm": "embed_norm",
}
# (reference Sequential index -> prismkit) in an expert stem: 0 is the resize (no weights),
# 1..12 the conv/BN/ReLU triples, 13 the 1x1 projection
_STEM_INDEX = {i: f"convs.{i - 1}" for i in range(1, 13)} | {13: "proj"}


class ConversionError(ValueError):
    """A checkpoint does not fit the Prismer reference layout; the message lists the keys."""


def _split_packed(prefix: str, leaf: str, value: Tensor, out: dict[str, Tensor]) -> None:
    """``in_proj_weight (3D, D)`` / ``in_proj_bias (3D,)`` -> q/k/v projections."""
    kind = "weight" if leaf == "in_proj_weight" else "bias"
    for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
        out[f"{prefix}.{name}.{kind}"] = part


def _block(
    prefix: str,
    packed: str,
    attn: str,
    table: dict[str, str],
    module: str,
    leaf: str,
    value: Tensor,
    out: dict[str, Tensor],
) -> bool:
    """One tensor of a block with a packed ``nn.MultiheadAttention`` (``packed``); False when the
    module is not part of the block."""
    if module == packed and leaf in ("in_proj_weight", "in_proj_bias"):
        _split_packed(f"{prefix}.{attn}", leaf, value, out)
    elif module in table:
        out[f"{prefix}.{table[module]}.{leaf}"] = value
    else:
        return False
    return True


def prismer_key_map(
    state_dict: dict[str, Tensor], stems: dict[str, str] | None = None
) -> dict[str, Tensor]:
    """Reference Prismer keys -> prismkit ``PrismerModel`` keys (pure: no I/O, inputs unchanged).

    ``stems`` renames the reference's stem domains to prismkit stem keys (default: the same
    name; ``"seg"`` is the shared segmentation stem, prismkit's stem group ``"seg"``). The tied
    LM-head aliases (``lm_head.decoder.weight`` = word embeddings, ``lm_head.decoder.bias`` =
    ``lm_head.bias``) are checked equal when present and dropped; ``position_ids`` buffers are
    dropped. Any other key that is not part of the reference layout raises
    :class:`ConversionError` listing them all.
    """
    stems = stems or {}
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        k = key
        if k.startswith("expert_encoder."):
            k = k.removeprefix("expert_encoder.")
            if k == "positional_embedding":
                out["vision.position_embedding"] = value
            elif k == "instance_embedding":
                out["instance_embedding"] = value
            elif k == "conv1.rgb.weight":
                out["vision.stem.proj.weight"] = value
            elif m := re.fullmatch(r"conv1\.(\w+)\.(\d+)\.(\w+)", k):
                domain, idx, leaf = m[1], int(m[2]), m[3]
                if idx not in _STEM_INDEX:
                    unknown.append(key)
                    continue
                out[f"expert_stems.{stems.get(domain, domain)}.{_STEM_INDEX[idx]}.{leaf}"] = value
            elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", k):
                target = f"vision.layers.{m[1]}"
                if not _block(target, "0.attn", "self_attn", _VIT_BLOCK, m[2], m[3], value, out):
                    unknown.append(key)
            elif k == "resampler.latents":
                out["resampler.latents"] = value
            elif m := re.fullmatch(r"resampler\.perceiver_blocks\.(\d+)\.(.+)\.(\w+)", k):
                target = f"resampler.layers.{m[1]}"
                if not _block(target, "attn", "attn", _RESAMPLER_BLOCK, m[2], m[3], value, out):
                    unknown.append(key)
            elif m := re.fullmatch(r"(ln_pre|ln_post)\.(\w+)", k):
                name = "pre_layrnorm" if m[1] == "ln_pre" else "post_layernorm"
                out[f"vision.{name}.{m[2]}"] = value
            else:
                unknown.append(key)
        elif k.startswith("text_decoder.roberta.embeddings."):
            rest = k.removeprefix("text_decoder.roberta.embeddings.")
            module, _, leaf = rest.rpartition(".")
            if rest in ("position_ids", "token_type_ids"):
                continue
            if module in _EMBEDDINGS:
                out[f"language.{_EMBEDDINGS[module]}.{leaf}"] = value
            else:
                unknown.append(key)
        elif m := re.fullmatch(
            r"text_decoder\.roberta\.encoder\.layer\.(\d+)\.(\d)\.(.+)\.(\w+)", k
        ):
            i, part, module, leaf = m[1], m[2], m[3], m[4]
            table = {"0": HF_LAYER, "1": _CROSS, "2": _LM_ADAPTOR}[part]
            if module in table:
                out[f"language.layers.{i}.{table[module]}.{leaf}"] = value
            else:
                unknown.append(key)
        elif m := re.fullmatch(r"text_decoder\.roberta\.encoder\.output_layer\.(.+)\.(\w+)", k):
            if m[1] in HF_LAYER:
                out[f"language.output_layer.{HF_LAYER[m[1]]}.{m[2]}"] = value
            else:
                unknown.append(key)
        elif k.startswith("text_decoder.lm_head."):
            rest = k.removeprefix("text_decoder.lm_head.")
            if rest in ("decoder.weight", "decoder.bias"):
                continue  # tied; checked below
            module, _, leaf = rest.rpartition(".")
            if rest == "bias":
                out["language.head.bias"] = value
            elif module in ("dense", "layer_norm"):
                out[f"language.head.{'dense' if module == 'dense' else 'norm'}.{leaf}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not part of the Prismer reference layout: {unknown[:20]}"
            + (" ..." if len(unknown) > 20 else "")
        )
    for alias, source in (
        ("text_decoder.lm_head.decoder.weight", "language.word_embeddings.weight"),
        ("text_decoder.lm_head.decoder.bias", "language.head.bias"),
    ):
        if (
            alias in state_dict
            and source in out
            and not torch.equal(state_dict[alias], out[source])
        ):
            raise ConversionError(f"{alias} is not tied to {source} as the reference ties it")
    return out


@dataclass
class Heads:
    """Attention heads: the checkpoint cannot tell them; the reference uses width / 64 for the
    ViT and the RoBERTa sizes it loads (12 for 768, 16 for 1024), and 8 in the resampler."""

    vision: int | None = None
    language: int | None = None
    resampler: int = 8


def _count(state_dict: dict[str, Tensor], pattern: str) -> int:
    found = {int(m[1]) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(
    state_dict: dict[str, Tensor],
    *,
    name: str = "",
    heads: Heads | None = None,
    image_size: int | None = None,
    seg_expert: str = "seg_coco",
    eps: float = 1e-5,
    experts: list[str] | None = None,
) -> ModelConfig:
    """A :class:`ModelConfig` with every dimension read from a reference state dict. The expert
    order is the reference configs' (``REFERENCE_ORDER``) unless ``experts`` (prismkit names,
    matching the checkpoint's stems) gives it."""
    heads = heads or Heads()
    try:
        rgb = state_dict["expert_encoder.conv1.rgb.weight"]
        pos = state_dict["expert_encoder.positional_embedding"]
        words = state_dict["text_decoder.roberta.embeddings.word_embeddings.weight"]
        positions = state_dict["text_decoder.roberta.embeddings.position_embeddings.weight"]
        types = state_dict["text_decoder.roberta.embeddings.token_type_embeddings.weight"]
        ffn = state_dict["text_decoder.roberta.encoder.layer.0.0.intermediate.dense.weight"]
        cross_key = state_dict["text_decoder.roberta.encoder.layer.0.1.self.key.weight"]
        adaptor = state_dict["expert_encoder.transformer.resblocks.0.1.adaptor.down_proj.weight"]
    except KeyError as e:
        raise ConversionError(
            f"not a Prismer reference checkpoint: {e.args[0]} is missing"
        ) from None
    width, patch = rgb.shape[0], rgb.shape[-1]
    grid = int(round(pos.shape[0] ** 0.5))
    if grid * grid != pos.shape[0]:
        raise ConversionError(f"positional embedding has {pos.shape[0]} rows, not a square grid")
    if image_size is None:
        image_size = next((s for s in REFERENCE_SIZES if s // patch == grid), grid * patch)
    elif image_size // patch != grid:
        raise ConversionError(
            f"image_size {image_size} gives a {image_size // patch}-token grid but the checkpoint's positions are {grid} x {grid}"
        )
    domains = [
        m[1]
        for k in state_dict
        if (m := re.fullmatch(r"expert_encoder\.conv1\.(\w+)\.1\.weight", k))
    ]
    unknown = [d for d in domains if d != "seg" and d not in REFERENCE_EXPERTS]
    if unknown:
        raise ConversionError(
            f"unknown expert stem(s) {['conv1.' + d for d in unknown]} in the checkpoint"
        )
    found = [
        seg_expert if d == "seg" else REFERENCE_EXPERTS[d]
        for d in sorted(domains, key=REFERENCE_ORDER.index)
    ]
    if experts is None:
        experts = found
    elif sorted(experts) != sorted(found):
        raise ConversionError(f"experts {experts} do not match the checkpoint's stems {found}")
    hidden = words.shape[1]
    latents = state_dict.get("expert_encoder.resampler.latents")
    data: dict[str, Any] = {
        "name": name or ("prismer_converted" if experts else "prismerz_converted"),
        "experts": experts,
        "vision": {
            "backbone": "clip_vit",
            "stem": "patch",
            "pretrained": None,
            "image_size": image_size,
            "expert_size": 224,
            "patch_size": patch,
            "width": width,
            "layers": _count(state_dict, r"expert_encoder\.transformer\.resblocks\.(\d+)\."),
            "heads": heads.vision or width // 64,
            "mlp_ratio": state_dict[
                "expert_encoder.transformer.resblocks.0.0.mlp.c_fc.weight"
            ].shape[0]
            / width,
            "act": "quick_gelu",
            "eps": 1e-5,
        },
        "language": {
            "backbone": "roberta",
            "pretrained": None,
            "tokenizer": ROBERTA_TOKENIZERS.get(hidden),
            "vocab_size": words.shape[0],
            "width": hidden,
            "layers": _count(state_dict, r"text_decoder\.roberta\.encoder\.layer\.(\d+)\."),
            "heads": heads.language or hidden // 64,
            "intermediate": ffn.shape[0],
            "max_positions": positions.shape[0],
            "type_vocab_size": types.shape[0],
            "eps": eps,
            "pad_token_id": 1,
            "output_layer": any(
                k.startswith("text_decoder.roberta.encoder.output_layer.") for k in state_dict
            ),
        },
        "adaptor": {"ratio": adaptor.shape[0] / adaptor.shape[1]},
    }
    if cross_key.shape[1] != width:
        raise ConversionError(
            f"cross-attention keys read {cross_key.shape[1]}-d vision tokens but the ViT is {width} wide"
        )
    if latents is not None:
        data["resampler"] = {
            "latents": latents.shape[0],
            "layers": _count(state_dict, r"expert_encoder\.resampler\.perceiver_blocks\.(\d+)\."),
            "heads": heads.resampler,
        }
    if "expert_encoder.instance_embedding" in state_dict:
        data["instance_embeddings"] = state_dict["expert_encoder.instance_embedding"].shape[0]
    return ModelConfig.from_dict(data, "converted checkpoint")


def load_reference_state(path: str | Path) -> dict[str, Tensor]:
    """A reference state dict from ``.bin``/``.pt`` (``torch.load(weights_only=True)``: tensors
    only, no code) or ``.safetensors``; fp16 tensors are upcast to float32 (integer buffers keep
    their dtype). An accelerate/FSDP wrapper prefix ``module.`` is removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(
                f"{path} cannot be read as a tensors-only state dict (torch.load weights_only=True): {e}"
            ) from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return {
        k.removeprefix("module."): (v.float() if v.is_floating_point() else v)
        for k, v in sd.items()
    }


def build_converted(
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    host: PluginHost | None = None,
):
    """The prismkit model for ``config`` with the reference weights loaded strictly."""
    from prismkit.core.model import PrismerModel

    host = host or get_plugin_manager()
    model = PrismerModel.from_config(config, host)
    stems = {"seg": next((s.stem for s in model.experts if s.stem == "seg"), "seg")}
    mapped = prismer_key_map(state_dict, stems)
    own = model.state_dict()
    # BatchNorm's num_batches_tracked is not in every export; keep ours when absent
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(mapped) - optional)
    unexpected = sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise ConversionError(
            f"checkpoint does not fit the model its own tensors describe: missing {missing[:20]}, "
            f"unexpected {unexpected[:20]}"
        )
    for k, v in mapped.items():
        if v.shape != own[k].shape:
            raise ConversionError(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict({**{k: own[k] for k in optional}, **mapped}, strict=True)
    return model


def convert_prismer(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    host: PluginHost | None = None,
    heads: Heads | None = None,
    image_size: int | None = None,
    seg_expert: str = "seg_coco",
    name: str = "",
    overwrite: bool = False,
) -> Path:
    """Convert an official checkpoint; writes ``OUT/model.safetensors`` (a prismkit checkpoint with
    every weight, frozen backbones included) and ``OUT/config.toml``. Returns the checkpoint path."""
    from prismkit.core.checkpoint import save_checkpoint
    from prismkit.core.io import atomic_write

    out = Path(out_dir)
    target = out / "model.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists: choose another --out or pass --overwrite")
    host = host or get_plugin_manager()
    state = load_reference_state(checkpoint)
    config = infer_config(
        state,
        name=name or Path(checkpoint).parent.name,
        heads=heads,
        image_size=image_size,
        seg_expert=seg_expert,
    )
    model = build_converted(state, config, host)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, target, host, extra={"converted_from": str(checkpoint)})
    atomic_write(out / "config.toml", lambda tmp: Path(tmp).write_text(dump_toml(config.to_dict())))
    return target
