"""BLIP (Li et al., ICML 2022) as a prismkit plugin: the ``blip`` architecture (BLIP's ViT, the
MED text model and its ITC/ITM/LM heads: pre-training, retrieval, captioning), the ``blip_vit``
vision backbone, the ``blip_frozen`` head (BLIP's objectives on Prismer's frozen backbones), the
``blip_pairs`` dataset reader, the ``convert``, ``capfilt`` and ``retrieval`` commands, and the
BLIP configs."""

from __future__ import annotations

from pathlib import Path

from prismkit.blip.commands import register_commands  # noqa: F401 - a hook of this plugin
from prismkit.blip.data import BlipPairs
from prismkit.blip.frozen import FrozenBLIPObjective
from prismkit.blip.model import BlipModel
from prismkit.blip.vit import BlipViT
from prismkit.core.config import register_config_folder
from prismkit.core.hookspecs import hookimpl

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hookimpl
def register_architectures(register) -> None:
    register(BlipModel)


@hookimpl
def register_vision_backbones(register) -> None:
    register(BlipViT)


@hookimpl
def register_heads(register) -> None:
    register(FrozenBLIPObjective)


@hookimpl
def register_datasets(register) -> None:
    register(BlipPairs)


@hookimpl
def register_model_configs(register) -> None:
    register_config_folder(register, CONFIG_DIR)
