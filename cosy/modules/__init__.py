"""Building blocks shared by cosy's models: masks, positional encodings, attention with a
preallocated KV cache, transformer/conformer encoders."""

from cosy.modules.attention import KVCache, MultiHeadAttention, RelPositionMultiHeadAttention
from cosy.modules.masks import (causal_mask, chunk_mask, ensure_visible, lengths_to_mask, padding_and_chunk_mask,
                                positions_chunk_mask)
from cosy.modules.positional import PositionalEncoding, RelPositionalEncoding, RotaryEmbedding
from cosy.modules.transformer import Encoder, EncoderConfig, EncoderLayer, rename_espnet_encoder_key

__all__ = [
    "Encoder", "EncoderConfig", "EncoderLayer", "KVCache", "MultiHeadAttention", "PositionalEncoding",
    "RelPositionMultiHeadAttention", "RelPositionalEncoding", "RotaryEmbedding", "causal_mask", "chunk_mask",
    "ensure_visible", "lengths_to_mask", "padding_and_chunk_mask", "positions_chunk_mask",
    "rename_espnet_encoder_key",
]
