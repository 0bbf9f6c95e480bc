"""Built-in plugin: the Prismer architecture (``architecture = "prismer"``, the default)."""

from prismkit.core.hookspecs import hookimpl
from prismkit.core.model import PrismerModel


@hookimpl
def register_architectures(register) -> None:
    register(PrismerModel)
