"""The language model as generation calls it under SimVLM's prefix LM: the prompt read as a
bidirectional prefix (decoder-only), or the decoder of the joint encoder-decoder."""

from __future__ import annotations

from torch import Tensor

from prismkit.core.language.decoder import DecoderCache, TextDecoder


class _DecoderView:
    """A wrapped ``TextDecoder``'s LM head and pad id, as ``beam_search`` reads them."""

    decoder: TextDecoder

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.logits(hidden)

    @property
    def pad_token_id(self) -> int:
        return self.decoder.pad_token_id


class PrefixDecoder(_DecoderView):
    """A :class:`TextDecoder` as ``beam_search``/``score_candidates`` call it, with the prompt as
    a bidirectional prefix: the first call (no cache) runs the prompt with ``prefix_len`` = its
    real tokens; cached steps add causal tokens; uncached re-runs (``use_cache=False``) keep the
    prompt's ``prefix_len`` (beams are reordered only among the rows of one prompt)."""

    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder
        self.prefix_len: Tensor | None = None

    def __call__(
        self,
        input_ids: Tensor,
        vision: Tensor | None,
        attention_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, DecoderCache]:
        if cache is not None:
            return self.decoder(input_ids, vision, attention_mask, cache=cache)
        if self.prefix_len is None:
            mask = input_ids.new_ones(input_ids.shape) if attention_mask is None else attention_mask
            self.prefix_len = mask.sum(1)
        elif input_ids.shape[0] != self.prefix_len.shape[0]:
            # the first call ran each prompt once (``decoder_step``: the same prompt for every
            # beam); uncached re-runs hold ``beams`` rows per prompt, in prompt order
            beams, rest = divmod(input_ids.shape[0], self.prefix_len.shape[0])
            if beams > 1 and not rest:
                self.prefix_len = self.prefix_len.repeat_interleave(beams)
        if input_ids.shape[0] != self.prefix_len.shape[0]:
            raise ValueError(
                f"prompt batch had {self.prefix_len.shape[0]} rows, this call {input_ids.shape[0]}"
            )
        return self.decoder(input_ids, vision, attention_mask, prefix_len=self.prefix_len)


class JointDecoder(_DecoderView):
    """The decoder of SimVLM's encoder-decoder as ``beam_search``/``score_candidates`` call it:
    ``vision`` is the joint encoding of image and prompt (``(B, Nv + P, D)``) whose padded prompt
    positions ``memory_mask (B, Nv + P)`` hides from the cross-attention.

    ``beam_search`` repeats each row's memory for its beams (``repeat_interleave``); a first call
    with ``k * B`` rows repeats the mask the same way. Cached steps read the mask from the cache.
    """

    def __init__(self, decoder: TextDecoder, memory_mask: Tensor) -> None:
        self.decoder = decoder
        self.memory_mask = memory_mask

    def __call__(
        self,
        input_ids: Tensor,
        vision: Tensor | None,
        attention_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, DecoderCache]:
        if cache is not None:
            return self.decoder(input_ids, vision, attention_mask, cache=cache)
        if vision is None:
            raise ValueError("the first decoder call needs the encoder output")
        rows, b = vision.shape[0], self.memory_mask.shape[0]
        if rows % b:
            raise ValueError(f"encoder output has {rows} rows, its mask {b}")
        mask = self.memory_mask.repeat_interleave(rows // b, dim=0)
        return self.decoder(input_ids, vision, attention_mask, vision_mask=mask)
