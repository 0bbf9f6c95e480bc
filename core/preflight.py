"""Before loading: are the weights a config names here? One error listing each missing source
and its fix, instead of a Hugging Face ``OSError`` from deep inside ``from_pretrained``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prismkit.core import weights
from prismkit.core.config import NO_WEIGHTS, ConfigError, ModelConfig

if TYPE_CHECKING:
    from prismkit.core.host import PluginHost


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - a declared dependency of transformers
        return True


def weight_sources(config: ModelConfig, host: PluginHost) -> list[tuple[str, str, str]]:
    """``(field, source, file that must exist)`` for each pretrained source the config loads:
    backbones, the image stem's own weights and the tokenizer."""
    out = []
    if config.vision.pretrained:
        out.append(("vision.pretrained", config.vision.pretrained, "config.json"))
    stem = host.image_stems.get(config.vision.stem)
    src = config.vision.stem_pretrained or stem.default_pretrained
    if src and src != NO_WEIGHTS:  # "none": a stem trained from random weights
        out.append(("vision.stem_pretrained", src, "config.json"))  # type: ignore[arg-type]
    if config.language.pretrained:
        out.append(("language.pretrained", config.language.pretrained, "config.json"))
    if config.language.tokenizer and config.language.tokenizer != config.language.pretrained:
        out.append(("language.tokenizer", config.language.tokenizer, "tokenizer_config.json"))
    return out


def missing_weights(config: ModelConfig, host: PluginHost, experts: bool = True) -> list[str]:
    """What cannot be loaded here, one line each with the fix. Hub ids count as missing only
    when the hub is offline (``HF_HUB_OFFLINE``); online they may still download. ``experts``:
    check the weights of the config's experts (and those they require) too."""
    problems = []
    offline = _hub_offline()
    for where, src, needs in weight_sources(config, host):
        local = src.startswith((weights.PACKAGE_PREFIX, ".", "/", "~"))
        if not local and not offline:
            continue
        st = weights.status(src, needs)
        if not st.available:
            problems.append(f"{where} = {src!r}: {st.where}")
    if experts:
        names = list(config.experts)
        for name in names:
            cls = host.expert(name)
            names += [r for r in cls.requires if r not in names]
            st = cls().weights_status()
            if not st.available:
                problems.append(f"expert {name!r}: weights missing ({st.where})")
    return problems


def require_weights(config: ModelConfig, host: PluginHost, experts: bool = True) -> None:
    """Raise ``ConfigError`` naming every missing weight source and its fix (see
    :func:`missing_weights`); ``prismkit plugins`` shows the same status for every config."""
    problems = missing_weights(config, host, experts)
    if problems:
        raise ConfigError(
            f"config {config.name!r} needs weights that are not here: " + "; ".join(problems)
        )
