"""BERT/RoBERTa layers run as a causal decoder, with new cross-attention and adaptors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prismkit.core import weights
from prismkit.core.config import LanguageConfig
from prismkit.core.layers import Attention, activation


@dataclass
class DecoderCache:
    """Keys/values for cached decoding: per layer self-attention ``(k, v)`` that grow by one
    position per step, cross-attention ``(k, v)`` computed once, and the key padding mask."""

    self_kv: list[tuple[Tensor, Tensor]]
    cross_kv: list[tuple[Tensor, Tensor] | None]
    # (B, T) 1 for real tokens, 0 for padding, over every position seen so far
    key_mask: Tensor
    # (B, 1, 1, Nv) bool: vision tokens the cross-attention may read (None: all)
    cross_mask: Tensor | None = None

    def select(self, index: Tensor) -> DecoderCache:
        """Reorder the batch (beam search)."""
        return DecoderCache(
            [(k[index], v[index]) for k, v in self.self_kv],
            [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross_kv],
            self.key_mask[index],
            None if self.cross_mask is None else self.cross_mask[index],
        )


class DecoderLayer(nn.Module):
    """Post-LN BERT layer: self-attention, then (new, pre-LN, zero-initialised) cross-attention to
    the vision tokens, an adaptor, then the feed-forward block."""

    def __init__(self, c: LanguageConfig, adaptor: nn.Module) -> None:
        super().__init__()
        self.self_attn = Attention(c.width, c.heads)
        self.attn_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.cross_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.cross_attn = Attention(c.width, c.heads)
        nn.init.zeros_(self.cross_attn.out_proj.weight)  # identity at start: the LM is unchanged
        nn.init.zeros_(self.cross_attn.out_proj.bias)
        self.adaptor = adaptor
        self.fc1 = nn.Linear(c.width, c.intermediate)
        self.fc2 = nn.Linear(c.intermediate, c.width)
        self.ffn_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.act = activation("gelu")

    def forward(
        self,
        x: Tensor,
        vision: Tensor | None,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        cross_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        a, self_kv = self.self_attn(x, mask=mask, past=past)
        x = self.attn_norm(x + a)
        if vision is not None or cross_kv is not None:
            c, cross_kv = self.cross_attn(
                self.cross_norm(x), kv=vision, mask=cross_mask, fixed_kv=cross_kv
            )
            x = x + c
        x = self.adaptor(x)  # text-only (no vision): the unimodal text model
        x = self.ffn_norm(x + self.fc2(self.act(self.fc1(x))))
        return x, self_kv, cross_kv


class LMHead(nn.Module):
    """BERT/RoBERTa prediction head: dense -> GELU -> LN -> tied word embeddings + bias."""

    def __init__(self, c: LanguageConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(c.width, c.width)
        self.norm = nn.LayerNorm(c.width, eps=c.eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.word_embeddings = [word_embeddings]  # tied, not a submodule: no duplicate parameter

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, self.word_embeddings[0].weight, self.bias)


class TextDecoder(nn.Module):
    """Causal decoder over token ids, attending to vision tokens ``(B, Nv, D)``.

    Subclasses (one per checkpoint family) set how positions are numbered and how checkpoint
    keys map onto this module.
    """

    name: ClassVar[str]
    # first position id (RoBERTa numbers positions from padding_idx + 1)
    position_offset: ClassVar[int] = 0
    # prefix of the encoder weights and of the MLM head in the transformers checkpoint
    hf_prefix: ClassVar[str]
    hf_head_prefix: ClassVar[str]

    def __init__(self, *, config: LanguageConfig, adaptor: Callable[[], nn.Module]) -> None:
        super().__init__()
        c = config
        if c.width % c.heads:
            raise ValueError(
                f"language.width {c.width} is not divisible by language.heads {c.heads}"
            )
        self.config = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.width)
        self.position_embeddings = nn.Embedding(c.max_positions, c.width)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.width)
        self.embed_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.layers = nn.ModuleList(DecoderLayer(c, adaptor()) for _ in range(c.layers))
        self.head = LMHead(c, self.word_embeddings)
        self.gradient_checkpointing = False

    @property
    def max_length(self) -> int:
        return self.config.max_positions - self.position_offset

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(
            positions + self.position_offset
        )
        return self.embed_norm(x + self.token_type_embeddings.weight[0])

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
            vision: ``(B, Nv, D)`` vision tokens; None when ``cache`` holds them, or for text
                alone (cross-attention skipped: BLIP's unimodal encoder, SimVLM's text-only data).
            attention_mask: ``(B, T)`` 1 for tokens, 0 for padding (left or right).
            prefix_len: ``(B,)`` tokens that attend bidirectionally (prefix LM); None = causal.
            vision_mask: ``(B, Nv)`` 1 = vision token, 0 = padding the cross-attention skips
                (None: all real; with ``cache``, the cached one).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = (
            attention_mask if cache is None else torch.cat([cache.key_mask, attention_mask], dim=1)
        )
        total = key_mask.shape[1]
        if total > self.max_length:
            raise ValueError(
                f"text of {total} tokens exceeds the language model's limit of {self.max_length}"
            )
        positions = (key_mask.cumsum(1) - 1).clamp(min=0)[:, total - t :]
        mask = self._mask(key_mask, t, prefix_len)
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
        return x, DecoderCache(self_kv, cross_kv, key_mask, cross_mask)

    @staticmethod
    def _mask(key_mask: Tensor, t: int, prefix_len: Tensor | None) -> Tensor:
        """``(B, 1, t, T)`` bool: causal over the last ``t`` queries, padding keys hidden, each
        query always sees itself (no empty rows), prefix tokens see the whole prefix."""
        total = key_mask.shape[1]
        q = torch.arange(total - t, total, device=key_mask.device)[:, None]
        k = torch.arange(total, device=key_mask.device)[None, :]
        allowed = (k <= q)[None] & key_mask[:, None, :].bool()
        if prefix_len is not None:
            # pad-aware: a token's index among real tokens decides whether it is in the prefix
            real_pos = key_mask.cumsum(1) - 1
            in_prefix = (real_pos < prefix_len[:, None]) & key_mask.bool()
            allowed = allowed | (in_prefix[:, None, :] & in_prefix[:, total - t :, None])
        allowed = allowed | (k == q)[None]
        return allowed[:, None]

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
        layer = {
            "attention.self.query": "self_attn.q_proj",
            "attention.self.key": "self_attn.k_proj",
            "attention.self.value": "self_attn.v_proj",
            "attention.output.dense": "self_attn.out_proj",
            "attention.output.LayerNorm": "attn_norm",
            "intermediate.dense": "fc1",
            "output.dense": "fc2",
            "output.LayerNorm": "ffn_norm",
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
                if rest == "position_ids" or rest == "token_type_ids":
                    continue
                out[emb[rest]] = value
            elif key.startswith(p + "encoder.layer."):
                idx, _, rest = key.removeprefix(p + "encoder.layer.").partition(".")
                module, _, leaf = rest.rpartition(".")
                out[f"layers.{idx}.{layer[module]}.{leaf}"] = value
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

    def load_pretrained(self, source: str) -> list[str]:
        """Load a transformers checkpoint (hub id or folder); returns the keys it did not hold
        (new cross-attention and adaptors; the MLM head for sentence encoders that ship none)."""
        from transformers import AutoModelForMaskedLM

        with weights.quiet_transformers():
            hf, info = AutoModelForMaskedLM.from_pretrained(
                weights.resolve(source), output_loading_info=True
            )
        hf_missing = set(info["missing_keys"])
        state = {k: v for k, v in hf.state_dict().items() if k not in hf_missing}
        state = self.checkpoint_filter(state)
        missing, unexpected = self.load_state_dict(state, strict=False)
        new = {
            k
            for k in self.state_dict()
            if ".cross_attn." in k or ".cross_norm." in k or ".adaptor." in k
        }
        head = {k for k in self.state_dict() if k.startswith("head.")}
        if unexpected or not (new <= set(missing) <= new | head):
            raise KeyError(
                f"{self.name} checkpoint {source!r} does not fit language config: "
                f"missing {sorted(set(missing) - new - head)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )
        return sorted(missing)


class RobertaDecoder(TextDecoder):
    name = "roberta"
    position_offset = 2  # padding_idx + 1
    hf_prefix = "roberta."
    hf_head_prefix = "lm_head."


class BertDecoder(TextDecoder):
    name = "bert"
    position_offset = 0
    hf_prefix = "bert."
    hf_head_prefix = "cls.predictions."
