"""BLIP (Li et al., ICML 2022) as a prismkit plugin: the ``blip`` head (ITC + ITM + LM), the
``capfilt`` and ``retrieval`` commands, and its model configs."""

from __future__ import annotations

from pathlib import Path

from prismkit.blip.commands import register_commands  # noqa: F401 - a hook of this plugin
from prismkit.blip.objective import BLIPObjective
from prismkit.core.config import register_config_folder
from prismkit.core.hookspecs import hookimpl

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hookimpl
def register_heads(register) -> None:
    register(BLIPObjective)


@hookimpl
def register_model_configs(register) -> None:
    register_config_folder(register, CONFIG_DIR)
