"""BLIP's multimodal mixture of encoder-decoder (MED, ``models/med.py``): one BERT code path that
runs as

- the unimodal text encoder (ITC): bidirectional self-attention + FFN, no cross-attention
  (``image_embeds=None``, BLIP's ``mode='text'``);
- the image-grounded text encoder (ITM, ``[ENC]`` first): self-attention, cross-attention to the
  image tokens, FFN in every layer (``mode='multimodal'``);
- the image-grounded decoder (LM, ``[DEC]`` first): the same with causal self-attention, and the
  LM head on top.

BERT's post-norm layers: ``h = LN(h + out(attn(h)))`` per block. Attention adds ``(1 - m) *
-10000`` to the scaled scores, as BERT's extended mask does (padded query rows are computed
too). Embeddings are word + absolute position (positions 0..T-1, pads included), no token types.
In BLIP pre-training the decoder shares every weight with the encoder except self-attention
(:func:`tie_encoder_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_VALUE = -10000.0


@dataclass(frozen=True)
class MedConfig:
    """The BERT sizes of a MED text model (BLIP's ``med_config.json``)."""

    # vocabulary (30522 bert-base-uncased + [DEC] + [ENC])
    vocab_size: int = 30524
    # hidden size H
    width: int = 768
    # transformer layers
    layers: int = 12
    # attention heads
    heads: int = 12
    # feed-forward hidden size
    intermediate: int = 3072
    # learned absolute positions
    max_positions: int = 512
    # LayerNorm epsilon
    eps: float = 1e-12
    # width of the image tokens the cross-attention reads (ViT width)
    encoder_width: int = 768
    # dropout on hidden states and attention probabilities (BERT: 0.1)
    dropout: float = 0.1
    # padding token (its embedding row gets no gradient, as nn.Embedding(padding_idx=...))
    pad_token_id: int = 0


def additive_mask(mask: Tensor, causal: bool, past: int = 0) -> Tensor:
    """``(B, T_k)`` 1/0 key mask -> ``(B, 1, T_q, T_k)`` float, 0 where attended and -10000 where
    not (BERT's ``get_extended_attention_mask``). ``causal``: query ``i`` (at position
    ``past + i``) sees keys ``<= past + i``; ``T_q = T_k - past``."""
    b, tk = mask.shape
    m = mask[:, None, None, :].float()
    if causal:
        tq = tk - past
        q = torch.arange(tq, device=mask.device)[:, None] + past
        k = torch.arange(tk, device=mask.device)[None, :]
        m = m * (k <= q).float()[None, None]
    return (1.0 - m) * MASK_VALUE


class MedAttention(nn.Module):
    """BERT attention block with its output: ``norm(x + dropout(out(attn)))``.

    ``forward(x (B, T, H), mask (B, 1, T, Tk) additive, kv (B, Tk, Dkv) | None, past (k, v) |
    None) -> (out (B, T, H), (k, v))``; keys/values come from ``kv`` (cross-attention) or
    ``x`` (self-attention, after ``past``)."""

    def __init__(self, width: int, heads: int, kv_width: int, eps: float, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(kv_width, width)
        self.v_proj = nn.Linear(kv_width, width)
        self.out_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.k_proj(kv)), self._split(self.v_proj(kv))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        kv: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        fixed_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q = self._split(self.q_proj(x))
        if fixed_kv is not None:
            k, v = fixed_kv
        else:
            k, v = self.project_kv(x if kv is None else kv)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, h, t, d = out.shape
        out = F.dropout(self.out_proj(out.transpose(1, 2).reshape(b, t, h * d)), p, self.training)
        return self.norm(x + out), (k, v)


class MedFeedForward(nn.Module):
    """``norm(x + dropout(fc2(gelu(fc1(x)))))`` (BERT's intermediate + output)."""

    def __init__(self, width: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        out = F.dropout(self.fc2(F.gelu(self.fc1(x))), self.dropout, self.training)
        return self.norm(x + out)


class MedLayer(nn.Module):
    """Self-attention, cross-attention to the image tokens (when given), feed-forward."""

    def __init__(self, cfg: MedConfig) -> None:
        super().__init__()
        self.self_attn = MedAttention(cfg.width, cfg.heads, cfg.width, cfg.eps, cfg.dropout)
        self.cross_attn = MedAttention(
            cfg.width, cfg.heads, cfg.encoder_width, cfg.eps, cfg.dropout
        )
        self.mlp = MedFeedForward(cfg.width, cfg.intermediate, cfg.eps, cfg.dropout)

    def forward(
        self,
        h: Tensor,
        mask: Tensor,
        image: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, kv = self.self_attn(h, mask, past=past)
        if image is not None or cross_kv is not None:
            # the image mask is all ones in BLIP: nothing to add
            h, _ = self.cross_attn(h, None, kv=image, fixed_kv=cross_kv)
        return self.mlp(h), kv


@dataclass
class MedCache:
    """Decoding state: per layer the self-attention keys/values ``(B, heads, T, d)``, the
    cross-attention keys/values of the image tokens, and the key mask so far ``(B, T)``."""

    self_kv: list[tuple[Tensor, Tensor]]
    cross_kv: list[tuple[Tensor, Tensor]]
    mask: Tensor

    def select(self, rows: Tensor) -> MedCache:
        """Reorder / repeat the batch rows (beam search)."""
        return MedCache(
            [(k[rows], v[rows]) for k, v in self.self_kv],
            [(k[rows], v[rows]) for k, v in self.cross_kv],
            self.mask[rows],
        )


class MedText(nn.Module):
    """The BERT text model of MED (BLIP's ``BertModel`` with ``add_pooling_layer=False``).

    ``forward(ids (B, T), mask (B, T), image (B, N, W) | None, causal=False) -> (B, T, H)``.
    ``image=None`` is BLIP's ``mode='text'``; ``causal=True`` is the decoder.
    """

    def __init__(self, cfg: MedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.layers = nn.ModuleList(MedLayer(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: N(0, 0.02) for linears and embeddings, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, ids: Tensor, past: int = 0) -> Tensor:
        t = ids.shape[1]
        if past + t > self.cfg.max_positions:
            raise ValueError(
                f"text of {past + t} tokens exceeds the model's {self.cfg.max_positions} positions"
            )
        pos = torch.arange(past, past + t, device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None]
        return F.dropout(self.embed_norm(x), self.cfg.dropout, self.training)

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        image: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention mask {tuple(mask.shape)} does not match ids {tuple(ids.shape)}"
            )
        h = self.embed(ids)
        add = additive_mask(mask, causal).to(h.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(
                    lambda x, lay=layer: lay(x, add, image)[0], h, use_reentrant=False
                )
            else:
                h, _ = layer(h, add, image)
        return h

    # -- cached decoding ------------------------------------------------------------------------
    def start(self, ids: Tensor, mask: Tensor, image: Tensor) -> tuple[Tensor, MedCache]:
        """Run the causal decoder on a prompt ``(B, P)``: ``(hidden (B, P, H), cache)``."""
        h = self.embed(ids)
        add = additive_mask(mask, causal=True).to(h.dtype)
        self_kv, cross_kv = [], []
        for layer in self.layers:
            ckv = layer.cross_attn.project_kv(image)
            h, kv = layer(h, add, None, cross_kv=ckv)
            self_kv.append(kv)
            cross_kv.append(ckv)
        return h, MedCache(self_kv, cross_kv, mask)

    def step(self, ids: Tensor, cache: MedCache) -> tuple[Tensor, MedCache]:
        """One new token per row ``(B, 1)`` after ``cache``: ``(hidden (B, 1, H), cache)``; the
        new token is attended (mask 1), as transformers' generation extends the mask with ones."""
        past = cache.mask.shape[1]
        mask = torch.cat([cache.mask, cache.mask.new_ones(ids.shape[0], 1)], dim=1)
        h = self.embed(ids, past)
        add = additive_mask(mask, causal=True, past=past).to(h.dtype)
        self_kv = []
        for layer, kv, ckv in zip(self.layers, cache.self_kv, cache.cross_kv, strict=True):
            h, new = layer(h, add, None, past=kv, cross_kv=ckv)
            self_kv.append(new)
        return h, MedCache(self_kv, cache.cross_kv, mask)


class MedLMHead(nn.Module):
    """BERT's LM head: ``dense -> GELU -> LayerNorm -> word_embeddings^T + bias``; the output
    matrix is the decoder's word embedding (tied), passed at call time."""

    def __init__(self, width: int, vocab: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: Tensor, embeddings: Tensor) -> Tensor:
        """``(..., H)`` -> logits ``(..., V)``."""
        return F.linear(self.norm(F.gelu(self.dense(hidden))), embeddings, self.bias)


def tie_encoder_decoder(encoder: MedText, decoder: MedText) -> None:
    """Share every decoder weight with the encoder except self-attention (BLIP pre-training's
    ``tie_encoder_decoder_weights(..., skip_key='/attention')``): embeddings, their LayerNorm,
    every layer's cross-attention and feed-forward become the encoder's modules."""
    if encoder.cfg != decoder.cfg:
        raise ValueError("tied encoder and decoder must have the same MED config")
    decoder.word_embeddings = encoder.word_embeddings
    decoder.position_embeddings = encoder.position_embeddings
    decoder.embed_norm = encoder.embed_norm
    for enc, dec in zip(encoder.layers, decoder.layers, strict=True):
        dec.cross_attn = enc.cross_attn
        dec.mlp = enc.mlp
