"""Typed model configs, read from TOML. One comment per field."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prismkit.core.host import PluginHost


# a weights field set to this means "no pretrained weights: random init" (TOML has no null)
NO_WEIGHTS = "none"


class ConfigError(ValueError):
    """A config file or field is wrong; the message names the file and the field."""


@dataclass
class VisionConfig:
    # registered vision backbone (transformer blocks + weight loader)
    backbone: str = "clip_vit"
    # registered image stem turning RGB into a patch grid
    stem: str = "patch"
    # hub id or local folder of the pretrained backbone; None = random init
    pretrained: str | None = None
    # weights of the image stem when it has its own (e.g. a CNN); None = stem's default;
    # "none" = random init (SimVLM from scratch: set stem_frozen = false)
    stem_pretrained: str | None = None
    # input resolution (square), pixels
    image_size: int = 224
    # side the expert label maps are resized to (nearest) whatever image_size is (Prismer: 224);
    # unset = image_size
    expert_size: int | None = None
    # stride of the stem: one token per patch_size x patch_size pixels
    patch_size: int = 16
    # transformer width
    width: int = 768
    # number of transformer blocks
    layers: int = 12
    # attention heads
    heads: int = 12
    # MLP hidden size = mlp_ratio * width
    mlp_ratio: float = 4.0
    # MLP activation: "quick_gelu" (CLIP) or "gelu"
    act: str = "quick_gelu"
    # LayerNorm epsilon
    eps: float = 1e-5
    # freeze the transformer blocks (attention, MLP and their LayerNorms; True for a pretrained
    # CLIP ViT); adaptors, ln_pre/ln_post and positions always train
    frozen: bool = True
    # freeze the image stem; unset = the stem's own default (Prismer trains the RGB patch conv, a
    # pretrained CNN trunk stays frozen)
    stem_frozen: bool | None = None
    # per-channel normalisation of RGB in [0, 1]
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LanguageConfig:
    # registered language backbone
    backbone: str = "roberta"
    # hub id or local folder of the pretrained model; None = random init
    pretrained: str | None = None
    # tokenizer hub id or folder; None = same as pretrained
    tokenizer: str | None = None
    # vocabulary size
    vocab_size: int = 50265
    # hidden size
    width: int = 768
    # decoder layers
    layers: int = 12
    # attention heads
    heads: int = 12
    # feed-forward hidden size
    intermediate: int = 3072
    # position embeddings in the checkpoint
    max_positions: int = 514
    # token-type embeddings in the checkpoint
    type_vocab_size: int = 1
    # LayerNorm epsilon
    eps: float = 1e-5
    # padding token id (RoBERTa numbers positions around it); None = the backbone's default
    pad_token_id: int | None = None
    # dropout on embeddings and sub-layer outputs while training (RoBERTa: 0.1)
    dropout: float = 0.1
    # dropout on attention probabilities while training (RoBERTa: 0.1)
    attention_dropout: float = 0.1
    # one more layer (self-attention + FFN, no cross-attention) after the last one (Prismer)
    output_layer: bool = True
    # start each cross-attention's output projection at zero (Flamingo's zero-initialised
    # gates; not the reference, which starts it random): the post-LN layer then passes the
    # pretrained model's states through unchanged until training moves it
    cross_attention_zero_init: bool = False
    # freeze the pretrained weights (pre-training); False fine-tunes the whole language model
    frozen: bool = True
    # special tokens added to the tokenizer (``tokenizer.add_special_tokens``), e.g. BLIP's
    # ``{ bos_token = "[DEC]", additional_special_tokens = ["[ENC]"] }``; ids follow the vocabulary
    special_tokens: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResamplerConfig:
    # registered resampler
    name: str = "perceiver"
    # learned latent queries (output tokens)
    latents: int = 64
    # cross-attention layers
    layers: int = 4
    # attention heads
    heads: int = 8


@dataclass
class AdaptorConfig:
    # registered adaptor
    name: str = "residual"
    # bottleneck width = ratio * model width (Prismer: 1)
    ratio: float = 1.0
    # activation between the two projections (Prismer: squared ReLU)
    act: str = "squared_relu"
    # start the up-projection at zero (not the reference: its adaptors start random); with a
    # pre-norm adaptor the frozen backbone is then unchanged at initialisation
    zero_init: bool = False


@dataclass
class TextConfig:
    # prompt of captions in training and generation ("A picture of" fine-tuned, "" zero-shot)
    caption_prompt: str = "A picture of"
    # Prismer's text clean-up: first letter upper-cased and the rest lower-cased, the characters
    # . ! " ( ) * # : ; ~ replaced by spaces, repeated spaces collapsed; questions end with "?"
    normalize: bool = True
    # words kept of a caption (prompt included) and of a question
    max_words: int = 30
    # tokens kept of a caption with BOS/EOS, and of a question with BOS (tokenizer truncation)
    caption_tokens: int = 30
    question_tokens: int = 35


@dataclass
class ModelConfig:
    # display name
    name: str = "prismer"
    # registered architecture (``register_architectures``) that builds the model
    architecture: str = "prismer"
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    # enabled experts by registered name; empty = PrismerZ (RGB only)
    experts: list[str] = field(default_factory=list)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    adaptor: AdaptorConfig = field(default_factory=AdaptorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # learned instance embeddings added per instance of an instance expert (detection)
    instance_embeddings: int = 128
    # label features of semantic experts: a Prismer label space (prismkit convert prismer-labels)
    # or a prismkit PCA file (prismkit experts fit-pca); unset = the default PCA
    label_space: str | None = None
    # registered head/objective
    head: str = "lm"
    # keyword options of the head (e.g. BLIP's queue_size, momentum, alpha)
    head_options: dict[str, Any] = field(default_factory=dict)
    # label smoothing of the next-token loss
    label_smoothing: float = 0.1
    # "sample_sum": token losses summed per sequence, then averaged over the batch (Prismer);
    # "token_mean": averaged over every target token of the batch
    loss_reduction: str = "sample_sum"
    # longest text (prompt + target) in tokens, including BOS/EOS
    max_text_len: int = 40

    @property
    def is_prismerz(self) -> bool:
        return not self.experts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        config = _build(cls, data, source, "")
        check_model_config(config, source)
        return config


def check_model_config(config: ModelConfig, source: str = "<config>") -> None:
    """Sizes that must be positive and widths that heads must divide; ``ConfigError`` naming the
    field and the fix otherwise (instead of a ZeroDivisionError deep in a layer)."""
    positive = {
        "vision.image_size": config.vision.image_size,
        "vision.patch_size": config.vision.patch_size,
        "vision.width": config.vision.width,
        "vision.heads": config.vision.heads,
        "language.vocab_size": config.language.vocab_size,
        "language.width": config.language.width,
        "language.heads": config.language.heads,
        "language.intermediate": config.language.intermediate,
        "language.max_positions": config.language.max_positions,
        "resampler.latents": config.resampler.latents,
        "resampler.heads": config.resampler.heads,
        "instance_embeddings": config.instance_embeddings,
        "max_text_len": config.max_text_len,
    }
    for where, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: field {where} must be at least 1, got {value}")
    for where, value in {
        "vision.layers": config.vision.layers,
        "language.layers": config.language.layers,
        "resampler.layers": config.resampler.layers,
    }.items():
        if value < 0:
            raise ConfigError(f"{source}: field {where} must be 0 or more, got {value}")
    for part in ("vision", "language"):
        c = getattr(config, part)
        if c.width % c.heads:
            raise ConfigError(
                f"{source}: field {part}.heads ({c.heads}) must divide {part}.width "
                f"({c.width}): pick a divisor of {c.width}"
            )


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: [{prefix.rstrip('.') or 'model'}] must be a table, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {[prefix + u for u in unknown]}; known: {sorted(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, source, prefix + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: field {where} must be a list, got {value!r}")
        return [_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(
                f"{source}: field {where} must be a list of {len(args)} numbers, got {value!r}"
            )
        return tuple(_coerce(a, v, source, where) for a, v in zip(args, value, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: field {where} must be {hint.__name__}, got {value!r}")
    return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """Read a model config TOML (``[model]`` table or top level), then apply ``a.b=value`` overrides."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    data = data.get("model", data)
    for item in overrides or []:
        apply_override(data, item, str(path))
    return ModelConfig.from_dict(data, str(path))


def apply_override(data: dict[str, Any], item: str, source: str = "--set") -> None:
    """Set ``data["a"]["b"] = value`` from ``"a.b=value"``; the value is parsed as TOML."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like field.sub=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    *parents, last = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def resolve_config(
    host: PluginHost, name_or_path: str | ModelConfig, overrides: list[str] | None = None
) -> ModelConfig:
    """A registered config name, a TOML path or a ModelConfig -> a new ModelConfig with the
    ``a.b=value`` overrides applied."""
    if isinstance(name_or_path, ModelConfig):
        value: Any = name_or_path
        source = name_or_path.name
    else:
        path = Path(name_or_path)
        if path.suffix != ".toml" and name_or_path in host.model_configs:
            value = host.model_configs.get(name_or_path)
        elif path.suffix != ".toml":
            raise ConfigError(
                f"unknown config {name_or_path!r}: not a .toml file; registered: {', '.join(host.model_configs.names())}"
            )
        else:
            value = path
        source = str(name_or_path)
    if not isinstance(value, ModelConfig):
        return load_config(value, overrides)
    data = value.to_dict()
    for item in overrides or []:
        apply_override(data, item, source)
    return ModelConfig.from_dict(data, source)


def register_config_folder(register, folder: str | Path) -> None:
    """Register every ``*.toml`` in ``folder`` under its file name (a plugin's
    ``register_model_configs`` hook: ``register_config_folder(register, CONFIG_DIR)``)."""
    for path in sorted(Path(folder).glob("*.toml")):
        register(path.stem, path)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """A config dict (``ModelConfig.to_dict()``) as TOML that ``load_config`` reads back; None
    values are left out (they are the defaults)."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in data.items()
        if v is not None and not isinstance(v, dict)
    ]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"]
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"
