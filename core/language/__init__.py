"""Language side: a frozen BERT/RoBERTa run as a causal decoder with cross-attention."""

from prismkit.core.language.decoder import DecoderCache, TextDecoder

__all__ = ["DecoderCache", "TextDecoder"]
