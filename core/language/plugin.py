"""Built-in plugin: language backbones."""

from prismkit.core.hookspecs import hookimpl
from prismkit.core.language.decoder import BertDecoder, RobertaDecoder


@hookimpl
def register_language_backbones(register) -> None:
    register(RobertaDecoder)
    register(BertDecoder)
