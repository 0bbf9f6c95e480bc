"""The architecture contract: what the engine, checkpoints and ``describe`` need of a model.

An architecture is an ``nn.Module`` class registered through ``register_architectures``; a
config's ``architecture`` field names it. Prismer (``PrismerModel``) is one, registered by the
built-in plugin ``prismkit.core.prismer_plugin``; BLIP's model is another (``prismkit.blip``).
The core never branches on the name: it calls these methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

if TYPE_CHECKING:
    from prismkit.core.config import ModelConfig
    from prismkit.core.host import PluginHost


@runtime_checkable
class Architecture(Protocol):
    """Methods every registered architecture provides.

    ``forward(images (B, 3, S, S) in [0, 1], input_ids (B, T), attention_mask (B, T),
    labels (B, T), **extra)`` returns an object with ``.loss`` and ``.parts`` (a dict of logged
    loss parts); ``extra`` carries what the engine knows of the batch (``experts``,
    ``image_idx (B,)`` stable image ids) and an architecture ignores what it does not use.
    """

    # registered name (``ModelConfig.architecture``)
    name: ClassVar[str]
    # the resolved config the model was built from (stored in checkpoints)
    config: ModelConfig

    @classmethod
    def from_config(cls, config: ModelConfig, host: PluginHost | None = None) -> Any:
        """Build the model with random weights; no file or network I/O."""
        ...

    def load_pretrained(self) -> None:
        """Read the pretrained weights the config names (hub ids, folders, packages)."""
        ...

    def freeze(self, stage: str = "pretrain") -> None:
        """Set ``requires_grad`` for training stage ``stage`` ("pretrain" | "finetune")."""
        ...

    def parameter_counts(self) -> dict[str, int]:
        """``{"trainable", "frozen", "total"}`` parameter counts."""
        ...

    def describe_title(self) -> str:
        """One line naming the variant, for ``prismkit describe``."""
        ...

    def describe_parts(self) -> list[tuple[str, nn.Module | None]]:
        """(label, module) rows for ``prismkit describe``."""
        ...

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Everything a checkpoint must hold to rebuild this model (with its pretrained sources)
        and resume training: trainable weights, and non-parameter training state (queues,
        pointers, momentum copies, step counters). Tensors are unique (tied weights once)."""
        ...

    def begin_step(self, step: int) -> None:
        """Called by the engine once per optimizer step, before its micro-batches: schedules
        (momentum updates, ramps, warm-ups) count optimizer steps, not forward calls."""
        ...

    def set_gradient_checkpointing(self, enabled: bool = True) -> None: ...


def unique_state(module: nn.Module, keep: set[str] | None = None) -> dict[str, Tensor]:
    """``module.state_dict()`` with tied tensors once (the first name, as ``named_parameters``
    reports it): safetensors refuses shared storage. ``keep`` limits the names kept."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if keep is not None and name not in keep:
            continue
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.contiguous().cpu()
    return out
