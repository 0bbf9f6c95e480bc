"""Expert labels into model inputs: run the experts on a batch, or read a label store, and embed
semantic labels."""

from __future__ import annotations

import torch

from prismkit.core.expert import Expert, LabelMap
from prismkit.core.host import PluginHost
from prismkit.core.model import ExpertInput, PrismerModel


def expert_labels(experts: dict[str, Expert], images: torch.Tensor) -> dict[str, LabelMap]:
    """Run experts on a batch in dependency order (each sees the labels it ``requires``)."""
    out: dict[str, LabelMap] = {}
    pending = list(experts.values())
    while pending:
        ready = [e for e in pending if all(r in out for r in e.requires)]
        if not ready:
            raise ValueError(
                f"experts {[e.name for e in pending]} require experts that are not enabled"
            )
        for e in ready:
            out[e.name] = e.check_output(e.predict(images, {r: out[r] for r in e.requires}), images)
            pending.remove(e)
    return out


def dense_inputs(experts: dict[str, Expert], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs of dense experts; semantic experts go through :class:`ExpertFeeder`."""
    semantic = [n for n, e in experts.items() if e.kind == "semantic"]
    if semantic:
        raise ValueError(
            f"expert(s) {semantic} are semantic: use ExpertFeeder, which embeds their labels"
        )
    return {n: m.values for n, m in expert_labels(experts, images).items()}


def label_embedder(source: str | None = None):
    """The label embedder a model config names (``label_space``): a Prismer label space converted
    from the reference's files, a prismkit PCA (``prismkit experts fit-pca``), or, unset, the
    default PCA (``$PRISMKIT_LABEL_PCA`` or fitted here)."""
    from prismkit.labels.embedding import LabelEmbedder
    from prismkit.labels.prismer_space import PrismerLabelSpace

    if source and PrismerLabelSpace.is_label_space(source):
        return PrismerLabelSpace.load(source)
    return LabelEmbedder.default(source)


class ExpertFeeder:
    """Expert inputs of a batch for the model: from a label store when one is given, else by
    running the experts on the batch. A label missing from the store is an error naming image and
    expert (training), or computed on the fly with ``compute_missing=True`` (inference)."""

    def __init__(
        self, model: PrismerModel, host: PluginHost, labels: str = "", compute_missing: bool = False
    ) -> None:
        self.compute_missing = compute_missing
        self.slots = list(getattr(model, "experts", ()))  # architectures without experts: none
        self.experts = {s.name: host.expert(s.name)() for s in self.slots}
        # experts needed as inputs of enabled ones (normals read depth) run too, unused by the model
        for e in list(self.experts.values()):
            for r in e.requires:
                self.experts.setdefault(r, host.expert(r)())
        self.store = None
        if labels:
            from prismkit.labels.store import LabelStore

            self.store = LabelStore(labels)
        self.embedder = None
        if any(s.kind == "semantic" for s in self.slots):
            self.embedder = label_embedder(model.config.label_space)

    def __call__(
        self,
        images: torch.Tensor,
        image_ids: list[str],
        maps: dict[str, LabelMap] | None = None,
    ) -> dict[str, ExpertInput]:
        """Model inputs of ``images`` (``(B, 3, S, S)``); ``maps`` (expert name -> labels of the
        batch, e.g. streamed with the images from a shard label store) are used as given."""
        if not self.slots:
            return {}
        if maps is None and self.store is not None:
            from prismkit.labels.store import MissingLabelsError

            try:
                maps = {
                    s.name: self.store.get_batch(
                        image_ids, type(self.experts[s.name]), images.shape[-2:]
                    )
                    for s in self.slots
                }
            except MissingLabelsError:
                if not self.compute_missing:
                    raise
        if maps is None:
            maps = expert_labels(self.experts, images)
        out: dict[str, ExpertInput] = {}
        for s in self.slots:
            if s.kind == "semantic":
                from prismkit.labels.embedding import semantic_input

                out[s.name] = semantic_input(
                    maps[s.name],
                    self.embedder,
                    instances=s.instances,
                    table=self.experts[s.name].label_table,
                )
            else:
                out[s.name] = maps[s.name].values
        return out
