"""The hooks a prismkit plugin can implement.

Every hook hands the plugin a ``register`` callback; the host owns naming and collisions
(a duplicate name raises and names both plugins). A plugin is a plain module listed under
``[project.entry-points.prismkit]`` in its distribution's pyproject::

    from prismkit import hookimpl

    @hookimpl
    def register_experts(register):
        register(MyExpert)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "prismkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_experts(register: Callable[[type], None]) -> None:
    """Register domain experts (subclasses of ``prismkit.experts.Expert``, defined in
    ``prismkit.core.expert``): ``register(DepthExpert)``.

    The class attributes ``name``, ``kind``, ``channels``, ``requires`` and ``version`` are the
    expert's contract; the core reads them and never branches on the name.
    """


@hookspec
def register_architectures(register: Callable[[type], None]) -> None:
    """Register model architectures: ``register(PrismerModel)``. An architecture is an
    ``nn.Module`` class with a ``name`` and ``from_config(config, host)``, and the methods of
    ``prismkit.core.architecture.Architecture`` (the engine, checkpoints and ``describe`` use
    nothing else); ``ModelConfig.architecture`` picks one by name."""


@hookspec
def register_image_stems(register: Callable[[type], None]) -> None:
    """Register image stems (``prismkit.core.vision.ImageStem`` subclasses) that turn an RGB batch
    ``(B, 3, H, W)`` into a feature grid ``(B, D, H/s, W/s)``: ``register(PatchStem)``."""


@hookspec
def register_vision_backbones(register: Callable[[type], None]) -> None:
    """Register vision transformers (``prismkit.core.vision.VisionBackbone`` subclasses) with their
    weight loader: ``register(ClipViT)``."""


@hookspec
def register_language_backbones(register: Callable[[type], None]) -> None:
    """Register language backbones (``prismkit.core.language.TextDecoder`` subclasses) run as
    causal decoders with cross-attention: ``register(RobertaDecoder)``. Constructor:
    ``cls(config=LanguageConfig, adaptor=factory, vision_width=int)``."""


@hookspec
def register_adaptors(register: Callable[[type], None]) -> None:
    """Register residual adaptors inserted in every vision block and language layer:
    ``register(ResidualAdaptor)``. Constructor: ``cls(width=..., hidden=..., act=...,
    post_norm=..., zero_init=..., eps=...)`` (``post_norm``: ``LN(x + f(x))``, the language side).
    """


@hookspec
def register_resamplers(register: Callable[[type], None]) -> None:
    """Register expert-token resamplers: ``register(PerceiverResampler)``. Constructor:
    ``cls(width=..., latents=..., layers=..., heads=...)``; forward ``(B, N, D) -> (B, L, D)``."""


@hookspec
def register_heads(register: Callable[[type], None]) -> None:
    """Register heads/objectives (``nn.Module``s the model owns): ``register(LMObjective)``.
    Constructor: ``cls(label_smoothing=..., width=..., vision_width=..., encoder_width=...)``
    (widths of the language model, of the vision tokens it reads, and of the vision transformer);
    called as ``objective(model, images=..., input_ids=..., attention_mask=..., labels=...,
    experts=..., prefix_len=..., **extra) -> (loss, parts)``; ``extra`` holds the samples'
    ``extras`` stacked, and ``has_image (B,)`` when a batch has text-only rows (``images`` and
    ``experts`` then cover the rows with an image only, in order, or are None). Optional: a
    class attribute ``text_only = True`` when the head trains on rows without an image, and
    a method ``generation_inputs(model, images, experts, input_ids, attention_mask) -> (decoder,
    vision, input_ids, attention_mask)`` when generation reads the prompt differently from the
    plain causal decoder (SimVLM's prefix)."""


@hookspec
def register_datasets(register: Callable[[type], None]) -> None:
    """Register dataset readers (``prismkit.core.data.VLDataset`` subclasses yielding ``Sample``):
    ``register(CocoCaptions)``. Constructed with keyword options from the run config's ``[data]``."""


@hookspec
def register_model_configs(register: Callable[[str, Any], None]) -> None:
    """Register named model configs: ``register("prismer_base", path_to_toml)``. The value is a
    path to a TOML file or a ``prismkit.core.config.ModelConfig``."""


@hookspec
def register_commands(register: Callable[[Any], None]) -> None:
    """Register ``prismkit`` subcommands (``prismkit.core.cli.Command``): ``register(Command(
    "capfilt", "BLIP CapFilt ...", configure))``, where ``configure(parser)`` adds the arguments
    and ``parser.set_defaults(func=run)``; ``run(args)`` returns the exit code and finds the
    plugin host in ``args.host``."""
