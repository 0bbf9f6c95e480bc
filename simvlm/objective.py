"""SimVLM's prefix-LM objective: a random split per sample after the prompt, the prefix read
bidirectionally (with the image), the suffix generated causally, the loss on the suffix."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from prismkit.core.heads import IGNORE, lm_loss
from prismkit.core.model import ExpertInput, PrismerModel, SemanticInput
from prismkit.simvlm.decoders import JointDecoder, PrefixDecoder


# -- the split ----------------------------------------------------------------------------------
def sample_prefix_len(
    attention_mask: Tensor, labels: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``(B, T)`` mask and labels -> ``(B,)`` real tokens in each prefix: BOS, the prompt (the
    real tokens before the first label) and ``s`` target tokens, ``s`` uniform over
    ``[0, n - 1]`` where ``n`` counts the labelled tokens (EOS included). ``s = 0`` is the
    image-only prefix (plain captioning after the prompt); at least one target token is always
    left to predict. A row without labels is all prefix. Drawn on the CPU from ``generator``
    (None: torch's default generator)."""
    real = attention_mask.bool()
    target = (labels != IGNORE) & real
    real_pos = attention_mask.long().cumsum(1) - 1
    n = target.sum(1).cpu()
    never = torch.iinfo(torch.long).max
    first = torch.where(target, real_pos, never).amin(1).cpu()
    first = torch.where(n > 0, first, real.sum(1).cpu())
    u = torch.rand(n.shape, generator=generator)
    s = torch.minimum((u * n).floor().long(), (n - 1).clamp(min=0))
    return (first + s).to(attention_mask.device)


class PrefixSplit(NamedTuple):
    """A batch cut at ``prefix_len`` for the encoder-decoder, each part packed to the left."""

    # (B, P) prefix tokens (BOS, prompt, text prefix) and their mask
    enc_ids: Tensor
    enc_mask: Tensor
    # (B, 1 + S) the decoder's input: the row's BOS, then the suffix tokens; mask; labels
    # (-100 on BOS and padding; the suffix tokens' own labels otherwise)
    dec_ids: Tensor
    dec_mask: Tensor
    dec_labels: Tensor


def _pack(x: Tensor, keep: Tensor, fill: int) -> tuple[Tensor, Tensor]:
    """The ``keep`` entries of each row of ``x (B, T)``, in order, packed left and padded with
    ``fill`` to the longest row -> ``(values (B, W), mask (B, W))``."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    lengths = keep.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width, device=x.device)[None] < lengths[:, None]
    return x.gather(1, order[:, :width]).masked_fill(~mask, fill), mask.long()


def first_tokens(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, T)`` -> ``(B, 1)``: each row's first real token (BOS; rows may be left-padded)."""
    first = (attention_mask.long().cumsum(1) == 1) & attention_mask.bool()
    return input_ids.gather(1, first.to(torch.int8).argmax(1, keepdim=True))


def split_prefix(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, prefix_len: Tensor
) -> PrefixSplit:
    """Cut each row after its first ``prefix_len`` real tokens: the prefix goes to the encoder,
    ``[BOS] + suffix`` to the decoder (which predicts every suffix token from the tokens before
    it and the encoder output). Left or right padding in, right padding out."""
    real = attention_mask.bool()
    real_pos = attention_mask.long().cumsum(1) - 1
    in_prefix = real & (real_pos < prefix_len[:, None])
    enc_ids, enc_mask = _pack(input_ids, in_prefix, 0)
    suf_ids, suf_mask = _pack(input_ids, real & ~in_prefix, 0)
    suf_labels, _ = _pack(labels, real & ~in_prefix, IGNORE)
    bos = first_tokens(input_ids, attention_mask)
    return PrefixSplit(
        enc_ids,
        enc_mask,
        torch.cat([bos, suf_ids], 1),
        torch.cat([torch.ones_like(bos), suf_mask], 1),
        torch.cat([torch.full_like(bos, IGNORE), suf_labels], 1),
    )


# -- rows with and without an image -----------------------------------------------------------
def _rows(experts: dict[str, ExpertInput] | None, rows: Tensor) -> dict[str, ExpertInput] | None:
    """The expert inputs of some rows of a batch (semantic tables are shared by the batch)."""
    if experts is None:
        return None
    return {
        name: SemanticInput(v.index[rows], v.table) if isinstance(v, SemanticInput) else v[rows]
        for name, v in experts.items()
    }


def _image_rows(
    images: Tensor, experts: dict[str, ExpertInput] | None, rows: Tensor, batch: int
) -> tuple[Tensor, dict[str, ExpertInput] | None]:
    """Images and expert inputs of the rows with an image. They come for every row of the
    batch (rows without an image ignored) or for the rows with an image only, in batch order."""
    n = images.shape[0]
    if n == len(rows):
        return images, experts
    if n == batch:
        return images[rows], _rows(experts, rows)
    raise ValueError(
        f"images has {n} rows: expected {batch} (the batch) or {len(rows)} (its rows with an image)"
    )


# -- the objective ------------------------------------------------------------------------------
class PrefixLMObjective(nn.Module):
    """SimVLM's prefix LM: each sample's text is split at a random point after its prompt (see
    :func:`sample_prefix_len`, or the caller's ``prefix_len``); only suffix tokens carry the
    (label-smoothed) next-token loss. Labels already -100 (prompt, padding) stay ignored.

    Two architectures (head option ``joint_encoder``):

    - ``False`` (decoder-only, the default): the vision transformer encodes the image alone;
      the language model reads the prefix bidirectionally and the suffix causally, every text
      token cross-attending to the image tokens.
    - ``True`` (the paper's encoder-decoder): one bidirectional encoder (the vision transformer)
      over ``[image tokens; prefix tokens]``, the prefix embedded with the language model's
      token and position embeddings (projected to the encoder's width when the widths differ);
      the language model decodes ``[BOS] + suffix`` causally, cross-attending to the whole
      encoder output (padded prefix positions hidden). The decoder sees the prefix only through
      the encoder.

    Text-only data (C4 in the paper): ``images=None``, or a per-sample ``has_image (B,)`` bool
    given as an extra forward kwarg (the training loop passes it when text-only samples are
    mixed in). ``images`` and ``experts`` then cover every row, or only the rows with an image,
    in batch order. Rows without an image are decoded with no image: decoder-only, the
    cross-attention is skipped; joint, the encoder reads the prefix alone. A mixed batch runs
    two passes (zeroed image tokens would still feed the cross-attention biases, so they are
    not the text-only model); the two losses are combined weighted by their target tokens,
    i.e. the per-token mean over the whole batch.

    Split points come from the generator seeded with ``seed``, or, when ``seed`` is None, from
    torch's default generator, which ``train`` seeds and checkpoints, so a resumed run draws the
    same splits.
    """

    name = "prefix_lm"
    # trains on rows without an image (the training loop's text-only mixing)
    text_only = True

    def __init__(
        self,
        *,
        label_smoothing: float = 0.1,
        seed: int | None = None,
        joint_encoder: bool = False,
        width: int | None = None,
        encoder_width: int | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.joint_encoder = joint_encoder
        self.text_proj: nn.Module | None = None
        if joint_encoder:
            if width is None or encoder_width is None:
                raise ValueError(
                    "head 'prefix_lm' with joint_encoder = true needs width= (language) and "
                    "encoder_width= (vision transformer) from the model builder"
                )
            # prefix embeddings (language width) enter the vision transformer
            self.text_proj = (
                nn.Identity() if width == encoder_width else nn.Linear(width, encoder_width)
            )

    # -- the joint encoder ---------------------------------------------------------------------
    def encode(
        self,
        model: PrismerModel,
        images: Tensor | None,
        experts: dict[str, ExpertInput] | None,
        ids: Tensor,
        mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The joint encoding of ``images (B, 3, S, S)`` (or None: text alone) and the prefix
        ``ids (B, P)`` -> ``memory (B, Nv + P, D_lang)`` and ``memory_mask (B, Nv + P)``."""
        if self.text_proj is None:
            raise RuntimeError("encode() is the joint encoder's: set head option joint_encoder")
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        text = self.text_proj(model.language.embed(ids, positions))
        if images is None:
            return model.vision.encode(text, mask), mask
        memory = model.encode_image(images, experts, text=text, text_mask=mask)
        image_tokens = mask.new_ones(mask.shape[0], memory.shape[1] - ids.shape[1])
        return memory, torch.cat([image_tokens, mask], 1)

    def _joint_loss(
        self,
        model: PrismerModel,
        images: Tensor | None,
        experts: dict[str, ExpertInput] | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        prefix_len: Tensor,
    ) -> Tensor:
        split = split_prefix(input_ids, attention_mask, labels, prefix_len)
        memory, memory_mask = self.encode(model, images, experts, split.enc_ids, split.enc_mask)
        hidden, _ = model.language(split.dec_ids, memory, split.dec_mask, vision_mask=memory_mask)
        return lm_loss(hidden, split.dec_labels, model.language.logits, self.label_smoothing)

    # -- training ------------------------------------------------------------------------------
    def forward(
        self,
        model: PrismerModel,
        *,
        images: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor,
        experts: dict[str, ExpertInput] | None = None,
        prefix_len: Tensor | None = None,
        has_image: Tensor | None = None,
        **_: object,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``input_ids``, ``attention_mask``, ``labels``: ``(B, T)``; ``images (B, 3, S, S)``
        (or the rows with an image) or None; ``prefix_len (B,)`` fixes the split (None:
        random); ``has_image (B,)`` bool."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prefix_len is None:
            prefix_len = sample_prefix_len(attention_mask, labels, self.generator)
        real_pos = attention_mask.cumsum(1) - 1
        labels = labels.masked_fill(real_pos < prefix_len[:, None], IGNORE)
        b = input_ids.shape[0]
        if has_image is None:
            has_image = torch.full((b,), images is not None, device=input_ids.device)
        has_image = has_image.to(device=input_ids.device, dtype=torch.bool)
        if images is None and bool(has_image.any()):
            raise ValueError("has_image marks samples with images, but images is None")
        total, count = None, 0
        for rows, with_image in (
            (has_image.nonzero()[:, 0], True),
            ((~has_image).nonzero()[:, 0], False),
        ):
            n = int((labels[rows, 1:] != IGNORE).sum())
            if n == 0:
                continue
            imgs, exps = None, None
            if with_image:
                assert images is not None
                imgs, exps = _image_rows(images, experts, rows, b)
            ids, mask, lab = input_ids[rows], attention_mask[rows], labels[rows]
            if self.joint_encoder:
                part = self._joint_loss(model, imgs, exps, ids, mask, lab, prefix_len[rows])
            else:
                vision = None if imgs is None else model.encode_image(imgs, exps)
                hidden, _ = model.language(ids, vision, mask, prefix_len=prefix_len[rows])
                part = lm_loss(hidden, lab, model.language.logits, self.label_smoothing)
            total, count = (part * n, n) if total is None else (total + part * n, count + n)
        if total is None:
            raise ValueError("batch has no target tokens in any suffix: every label is -100")
        loss = total / count
        return loss, {"prefix_lm": loss.detach()}

    # -- generation ----------------------------------------------------------------------------
    def generation_inputs(
        self,
        model: PrismerModel,
        images: Tensor,
        experts: dict[str, ExpertInput] | None,
        input_ids: Tensor,
        attention_mask: Tensor,
    ) -> tuple[PrefixDecoder | JointDecoder, Tensor, Tensor, Tensor]:
        """Generation reads the prompt ``input_ids (B, P)`` as the prefix, as training did:
        decoder-only, a bidirectional prompt before the causal continuation; joint, the prompt
        encoded with the image and the decoder starting from BOS."""
        if not self.joint_encoder:
            vision = model.encode_image(images, experts)
            return PrefixDecoder(model.language), vision, input_ids, attention_mask
        memory, memory_mask = self.encode(model, images, experts, input_ids, attention_mask)
        bos = first_tokens(input_ids, attention_mask)
        return JointDecoder(model.language, memory_mask), memory, bos, torch.ones_like(bos)
