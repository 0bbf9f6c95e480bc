"""BERT/RoBERTa layers run as a causal decoder with cross-attention to the vision tokens and
adaptors, as Prismer's ``RobertaForCausalLMModified`` builds it.

Each layer: post-LN self-attention (causal, padding keys hidden) -> post-LN cross-attention to
the vision tokens (keys/values projected from the vision width) -> post-norm adaptor -> post-LN
feed-forward; then one more layer without cross-attention (``output_layer``); then the LM head
tied to the word embeddings. Dropout on embeddings, attention probabilities and sub-layer
outputs while training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.config import LanguageConfig
from prismkit.core.language import tied
from prismkit.core.layers import Attention, LayerNorm32, Linear, activation, linear


@dataclass
class DecoderCache:
    """Keys/values for cached decoding: per layer self-attention ``(k, v)`` that grow by one
    position per step, cross-attention ``(k, v)`` computed once, the key padding mask and the
    number of real (non-padding) tokens seen so far (RoBERTa numbers positions by it)."""

    self_kv: list[tuple[Tensor, Tensor]]
    cross_kv: list[tuple[Tensor, Tensor] | None]
    # (B, T) 1 for real tokens, 0 for padding, over every position seen so far
    key_mask: Tensor
    # (B,) real tokens so far
    real: Tensor
    # (B, 1, 1, Nv) bool: vision tokens the cross-attention may read (None: all)
    cross_mask: Tensor | None = None

    def select(self, index: Tensor) -> DecoderCache:
        """Reorder the batch (beam search). Cross-attention keys/values shared by groups of rows
        (one image's beams, see :func:`prismkit.core.generation.decoder_step`) stay as they are
        when every row stays in its group, which beam search guarantees; otherwise they are
        gathered per row."""
        return DecoderCache(
            [(k[index], v[index]) for k, v in self.self_kv],
            [None if kv is None else _select_shared(kv, index) for kv in self.cross_kv],
            self.key_mask[index],
            self.real[index],
            None if self.cross_mask is None else _select_shared(self.cross_mask, index),
        )

    def repeat_rows(self, index: Tensor) -> DecoderCache:
        """Rows ``index`` (``g`` consecutive copies of each row: one input's beams) of the
        per-row state; the cross-attention keys/values and their mask stay one row per input,
        each serving its ``g`` rows (see :func:`_select_shared`)."""
        return DecoderCache(
            [(k[index], v[index]) for k, v in self.self_kv],
            self.cross_kv,
            self.key_mask[index],
            self.real[index],
            self.cross_mask,
        )


def _select_shared(t: Tensor | tuple[Tensor, Tensor], index: Tensor):
    """Rows ``index`` of keys/values ``(R, H, T, Dh)`` (a pair) or of their key mask ``(R, 1, 1,
    T)`` whose row r serves query rows ``r g .. r g + g - 1`` (``g = len(index) / R``)."""
    first = t[0] if isinstance(t, tuple) else t
    rows = first.shape[0]
    if rows == index.shape[0]:
        return (t[0][index], t[1][index]) if isinstance(t, tuple) else t[index]
    group = index.shape[0] // rows
    owner = index // group
    if torch.equal(owner, torch.arange(index.shape[0], device=index.device) // group):
        return t
    return (t[0][owner], t[1][owner]) if isinstance(t, tuple) else t[owner]


class DecoderLayer(nn.Module):
    """RoBERTa layer with Prismer's additions (``cross``: cross-attention and adaptor)."""

    def __init__(
        self,
        c: LanguageConfig,
        *,
        vision_width: int | None,
        adaptor: nn.Module | None,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(c.width, c.heads, dropout=c.attention_dropout)
        self.attn_norm = LayerNorm32(c.width, eps=c.eps)
        self.cross_attn = self.cross_norm = None
        if vision_width is not None:
            self.cross_attn = Attention(
                c.width, c.heads, kv_width=vision_width, dropout=c.attention_dropout
            )
            self.cross_norm = LayerNorm32(c.width, eps=c.eps)
            if c.cross_attention_zero_init:
                nn.init.zeros_(self.cross_attn.out_proj.weight)
                nn.init.zeros_(self.cross_attn.out_proj.bias)
        self.adaptor = adaptor
        self.fc1 = Linear(c.width, c.intermediate)
        self.fc2 = Linear(c.intermediate, c.width)
        self.ffn_norm = LayerNorm32(c.width, eps=c.eps)
        self.act = activation("gelu")
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: Tensor,
        vision: Tensor | None,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        cross_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        a, self_kv = self.self_attn(x, mask=mask, past=past)
        x = self.attn_norm(x + self.dropout(a))
        if self.cross_attn is not None and (vision is not None or cross_kv is not None):
            c, cross_kv = self.cross_attn(x, kv=vision, mask=cross_mask, fixed_kv=cross_kv)
            x = self.cross_norm(x + self.dropout(c))
        if self.adaptor is not None:
            x = self.adaptor(x)  # text alone (no vision): the unimodal text model + adaptors
        x = self.ffn_norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))
        return x, self_kv, cross_kv


class LMHead(nn.Module):
    """BERT/RoBERTa prediction head: dense -> GELU -> LN -> tied word embeddings + bias."""

    def __init__(self, c: LanguageConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = Linear(c.width, c.width)
        self.norm = LayerNorm32(c.width, eps=c.eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.word_embeddings = [word_embeddings]  # tied, not a submodule: no duplicate parameter
        self.link: tied.TiedLink | None = None  # the decoder's latest training lookup

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        w = self.word_embeddings[0].weight
        if tied.applies(w):  # its weight gradient joins the lookup's (core/language/tied.py)
            return tied.head(x, w, self.bias, self.link)
        return linear(x, w, self.bias)


class TextDecoder(nn.Module):
    """Causal decoder over token ids, attending to vision tokens ``(B, Nv, Dv)``.

    Subclasses (one per checkpoint family) set how positions are numbered and how checkpoint keys
    map onto this module.
    """

    name: ClassVar[str]
    # "roberta": positions count real tokens from pad_token_id + 1, padding gets pad_token_id
    # (fairseq's make_positions, so tokens after padding continue the count); "bert": positions
    # count real tokens from 0 (left or right padding both work)
    position_rule: ClassVar[str]
    default_pad_token_id: ClassVar[int]
    # prefix of the encoder weights and of the MLM head in the transformers checkpoint
    hf_prefix: ClassVar[str]
    hf_head_prefix: ClassVar[str]

    def __init__(
        self,
        *,
        config: LanguageConfig,
        adaptor: Callable[[], nn.Module],
        vision_width: int | None = None,
    ) -> None:
        super().__init__()
        c = config
        if c.width % c.heads:
            raise ValueError(
                f"language.width {c.width} is not divisible by language.heads {c.heads}"
            )
        self.config = c
        self.pad_token_id = (
            c.pad_token_id if c.pad_token_id is not None else self.default_pad_token_id
        )
        pad = self.pad_token_id if self.position_rule == "roberta" else None
        self.word_embeddings = nn.Embedding(c.vocab_size, c.width, padding_idx=pad)
        self.position_embeddings = nn.Embedding(c.max_positions, c.width, padding_idx=pad)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.width)
        self.embed_norm = LayerNorm32(c.width, eps=c.eps)
        self.embed_dropout = nn.Dropout(c.dropout)
        vw = vision_width or c.width
        self.layers = nn.ModuleList(
            DecoderLayer(c, vision_width=vw, adaptor=adaptor()) for _ in range(c.layers)
        )
        self.output_layer = (
            DecoderLayer(c, vision_width=None, adaptor=None) if c.output_layer else None
        )
        self.head = LMHead(c, self.word_embeddings)
        self.gradient_checkpointing = False
        # a step whose loss skips the LM head leaves only the sparse lookup gradient: densify it
        # (optimizers such as fused AdamW take dense gradients only)
        self.word_embeddings.weight.register_post_accumulate_grad_hook(_densify_grad)

    @property
    def max_length(self) -> int:
        offset = self.pad_token_id + 1 if self.position_rule == "roberta" else 0
        return self.config.max_positions - offset

    def positions(
        self, input_ids: Tensor, key_mask: Tensor, real_before: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Position ids of ``input_ids (B, t)`` (the newest t of ``key_mask (B, T)``) and the real
        tokens counted so far ``(B,)``."""
        if self.position_rule == "roberta":
            real = (input_ids != self.pad_token_id).long()
            count = real.cumsum(1) + (0 if real_before is None else real_before[:, None])
            return count * real + self.pad_token_id, count[:, -1]
        t = input_ids.shape[1]
        count = key_mask.long().cumsum(1)
        return (count - 1).clamp(min=0)[:, -t:], count[:, -1]

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        w = self.word_embeddings.weight
        pad = self.word_embeddings.padding_idx
        if tied.applies(w):
            # float32 training: the tied head's (V, D) gradient is formed in this lookup's
            # backward, which adds its rows in place (core/language/tied.py)
            self.head.link = link = tied.TiedLink()
            x = tied.lookup(input_ids, w, pad, link)
        else:
            # the lookup's gradient as sparse rows (no zero-filled dense (V, D) lookup gradient;
            # autograd sums them with the head's out of place). torch.compile traces the dense
            # lookup: its graphs do not take sparse gradients
            sparse = (
                torch.is_grad_enabled() and w.requires_grad and not torch.compiler.is_compiling()
            )
            x = F.embedding(input_ids, w, pad, sparse=sparse)
        x = x + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)
        return self.embed_dropout(self.embed_norm(x))

    def forward(
        self,
        input_ids: Tensor,
        vision: Tensor | None,
        attention_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        prefix_len: Tensor | None = None,
        vision_mask: Tensor | None = None,
    ) -> tuple[Tensor, DecoderCache]:
        """Hidden states ``(B, T, D)`` and the updated cache.

        Args:
            input_ids: ``(B, T)`` token ids (new tokens only when ``cache`` is given).
            vision: ``(B, Nv, Dv)`` vision tokens; None when ``cache`` holds them, or for text
                alone (cross-attention skipped: BLIP's unimodal encoder, SimVLM's text-only data).
                ``(B / g, Nv, Dv)`` serves each group of ``g`` consecutive rows (the beams of one
                image): their keys/values are projected and kept once.
            attention_mask: ``(B, T)`` 1 for tokens, 0 for padding; with ``cache``, the new
                tokens' mask or the mask over every position so far.
            prefix_len: ``(B,)`` tokens that attend bidirectionally (prefix LM); None = causal.
            vision_mask: ``(B, Nv)`` 1 = vision token, 0 = padding the cross-attention skips
                (None: all real; with ``cache``, the cached one).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is None or attention_mask.shape[1] == cache.key_mask.shape[1] + t:
            key_mask = attention_mask
        else:
            key_mask = torch.cat([cache.key_mask, attention_mask], dim=1)
        total = key_mask.shape[1]
        positions, real = self.positions(input_ids, key_mask, None if cache is None else cache.real)
        if total > self.max_length:
            raise ValueError(
                f"text of {total} tokens exceeds the language model's limit of {self.max_length}"
            )
        mask = self._mask(key_mask, t, prefix_len, self.word_embeddings.weight.dtype)
        x = self.embed(input_ids, positions)
        if vision_mask is not None:
            cross_mask = vision_mask.bool()[:, None, None, :]
        else:
            cross_mask = cache.cross_mask if cache is not None else None
        self_kv, cross_kv = [], []
        for i, layer in enumerate(self.layers):
            past = cache.self_kv[i] if cache is not None else None
            ckv = cache.cross_kv[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x, skv, ckv = torch.utils.checkpoint.checkpoint(
                    layer, x, vision, mask, past, ckv, cross_mask, use_reentrant=False
                )
            else:
                x, skv, ckv = layer(x, vision, mask, past, ckv, cross_mask)
            self_kv.append(skv)
            cross_kv.append(ckv)
        if self.output_layer is not None:
            past = cache.self_kv[len(self.layers)] if cache is not None else None
            x, skv, _ = self.output_layer(x, None, mask, past)
            self_kv.append(skv)
        return x, DecoderCache(self_kv, cross_kv, key_mask, real, cross_mask)

    @staticmethod
    def _mask(key_mask: Tensor, t: int, prefix_len: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``(B, 1, t, T)`` additive mask (0 allowed, the dtype's minimum hidden), as transformers
        builds it: causal over the last ``t`` queries and padding keys hidden (a query that sees
        nothing attends uniformly, as there); prefix tokens see the whole prefix."""
        total = key_mask.shape[1]
        q = torch.arange(total - t, total, device=key_mask.device)[:, None]
        k = torch.arange(total, device=key_mask.device)[None, :]
        allowed = (k <= q)[None] & key_mask[:, None, :].bool()
        if prefix_len is not None:
            # pad-aware: a token's index among real tokens decides whether it is in the prefix
            real_pos = key_mask.cumsum(1) - 1
            in_prefix = (real_pos < prefix_len[:, None]) & key_mask.bool()
            allowed = allowed | (in_prefix[:, None, :] & in_prefix[:, total - t :, None])
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    # -- weights ---------------------------------------------------------------------------
    def checkpoint_filter(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename transformers ``*ForMaskedLM`` keys to this module's (pure function)."""
        p, h = self.hf_prefix, self.hf_head_prefix
        emb = {
            "word_embeddings.weight": "word_embeddings.weight",
            "position_embeddings.weight": "position_embeddings.weight",
            "token_type_embeddings.weight": "token_type_embeddings.weight",
            "LayerNorm.weight": "embed_norm.weight",
            "LayerNorm.bias": "embed_norm.bias",
        }
        head = {
            "dense": "head.dense",
            "layer_norm": "head.norm",
            "transform.dense": "head.dense",
            "transform.LayerNorm": "head.norm",
        }
        out: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith(p + "embeddings."):
                rest = key.removeprefix(p + "embeddings.")
                if rest in ("position_ids", "token_type_ids"):
                    continue
                out[emb[rest]] = value
            elif key.startswith(p + "encoder.layer."):
                idx, _, rest = key.removeprefix(p + "encoder.layer.").partition(".")
                module, _, leaf = rest.rpartition(".")
                out[f"layers.{idx}.{HF_LAYER[module]}.{leaf}"] = value
            elif key.startswith(h):
                rest = key.removeprefix(h)
                module, _, leaf = rest.rpartition(".")
                if module in ("decoder", "") and leaf == "bias" or rest == "bias":
                    out["head.bias"] = value
                elif module == "decoder":
                    continue  # tied to the word embeddings
                else:
                    out[f"{head[module]}.{leaf}"] = value
            elif key.startswith(p + "pooler."):
                continue
            else:
                raise KeyError(f"unexpected key {key!r} in {self.name} checkpoint")
        return out

    def new_parameter_names(self) -> set[str]:
        """State-dict keys a pretrained language model does not hold: cross-attention, adaptors
        and the output layer."""
        return {
            k
            for k in self.state_dict()
            if ".cross_attn." in k
            or ".cross_norm." in k
            or ".adaptor." in k
            or k.startswith("output_layer.")
        }

    def load_pretrained(self, source: str) -> list[str]:
        """Load a transformers checkpoint (hub id or folder); returns the keys it did not hold
        (new cross-attention, adaptors and output layer; the MLM head for sentence encoders that
        ship none), which keep their initialisation."""
        from transformers import AutoModelForMaskedLM

        with weights.quiet_transformers():
            hf, info = AutoModelForMaskedLM.from_pretrained(
                weights.resolve(source), output_loading_info=True
            )
        hf_missing = set(info["missing_keys"])
        state = self.checkpoint_filter(
            {k: v for k, v in hf.state_dict().items() if k not in hf_missing}
        )
        own = self.state_dict()
        new = self.new_parameter_names()
        head = {k for k in own if k.startswith("head.")}
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if unexpected or not (new <= missing <= new | head):
            raise KeyError(
                f"{self.name} checkpoint {source!r} does not fit language config: "
                f"missing {sorted(missing - new - head)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise KeyError(
                    f"{self.name} checkpoint {source!r}: {k} is {tuple(v.shape)}, the language config needs {tuple(own[k].shape)}"
                )
        self.load_state_dict(state | {k: own[k] for k in missing}, strict=True)
        return sorted(missing)


def _densify_grad(param: Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


# transformers' BERT/RoBERTa layer module -> DecoderLayer module
HF_LAYER = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "ffn_norm",
}


class RobertaDecoder(TextDecoder):
    name = "roberta"
    position_rule = "roberta"
    default_pad_token_id = 1
    hf_prefix = "roberta."
    hf_head_prefix = "lm_head."


class BertDecoder(TextDecoder):
    name = "bert"
    position_rule = "bert"
    default_pad_token_id = 0
    hf_prefix = "bert."
    hf_head_prefix = "cls.predictions."
