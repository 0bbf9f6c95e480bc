"""Built-in plugin: the named model configs shipped as TOML files beside this module."""

from pathlib import Path

from prismkit.core.config import register_config_folder
from prismkit.core.hookspecs import hookimpl

CONFIG_DIR = Path(__file__).resolve().parent


@hookimpl
def register_model_configs(register) -> None:
    register_config_folder(register, CONFIG_DIR)
