"""SimVLM (Wang et al., ICLR 2022) as a prismkit plugin: a ResNet conv image tokenizer
(``resnet_stages``, ``resnet152_stages``), the prefix-LM objective (``prefix_lm``: decoder-only,
or the paper's encoder-decoder with ``joint_encoder``), the ``text_corpus`` text-only reader,
the ``none`` adaptor (models trained from scratch), zero-shot captioning / open-ended VQA with
the prompt as prefix, and its model configs (``simvlm_base``: the paper, from scratch;
``simvlm_pretrained_base`` and ``offline_default_simvlm``: its objective on pretrained
backbones). README.md reads it against the paper point by point.
"""

from __future__ import annotations

from pathlib import Path

from prismkit.core.config import register_config_folder
from prismkit.core.hookspecs import hookimpl
from prismkit.simvlm.data import TextCorpus
from prismkit.simvlm.objective import PrefixLMObjective
from prismkit.simvlm.stems import NoAdaptor, ResNet152StagesStem, ResNetStagesStem

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hookimpl
def register_image_stems(register) -> None:
    register(ResNetStagesStem)
    register(ResNet152StagesStem)


@hookimpl
def register_adaptors(register) -> None:
    register(NoAdaptor)


@hookimpl
def register_heads(register) -> None:
    register(PrefixLMObjective)


@hookimpl
def register_datasets(register) -> None:
    register(TextCorpus)


@hookimpl
def register_model_configs(register) -> None:
    register_config_folder(register, CONFIG_DIR)
