"""``prismkit bench`` (plugin ``bench``)."""

from __future__ import annotations

import argparse

from prismkit.core.cli import Command
from prismkit.core.hookspecs import hookimpl


def _configure(p: argparse.ArgumentParser) -> None:
    from prismkit.bench import run

    run.add_arguments(p)
    p.set_defaults(func=run.run)


@hookimpl
def register_commands(register) -> None:
    register(Command("bench", "speed/memory benchmark: prints tables, writes JSON", _configure))
