"""Transformer / Conformer encoder shared by the text encoder, the LM, the flow encoder
and the speech tokenizer.

Layer layout (pre-norm, LayerNorm eps `norm_eps`, 1e-12 by default as in ESPnet):

    [conformer + macaron]  x += 0.5 * FF_macaron(LN(x))
                           x += Attention(LN(x))
    [conformer + conv]     x += Conv(LN(x))
                           x += s * FF(LN(x))     s = 0.5 with macaron, else 1
    [conformer + conv]     x = LN_final(x)

"transformer" layers use a ReLU FFN, "conformer" layers a SiLU FFN. The encoder is
input layer -> positional encoding -> layers -> `after_norm` (LayerNorm eps 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosy.modules.attention import KVCache, MultiHeadAttention, RelPositionMultiHeadAttention
from cosy.modules.masks import ensure_visible, lengths_to_mask, padding_and_chunk_mask, positions_chunk_mask
from cosy.modules.positional import PositionalEncoding, RelPositionalEncoding, RotaryEmbedding


@dataclass
class EncoderConfig:
    """Sizes and variants of an `Encoder`.

    input_layer: "linear" (Linear + LayerNorm), "linear_legacy" (Linear + LayerNorm +
        ReLU), "conv2d2" / "conv2d4" (2-D convolutions subsampling time by 2 / 4, output
        length ceil(T / factor)), "conv1d2" / "conv1d4" (Whisper-style 1-D convolutions,
        same lengths, about 10x fewer multiply-adds), "none" (input_size must equal d_model).
    pos_enc: "rel_pos" (ESPnet relative attention; input scaled by sqrt(d_model)),
        "abs" (sinusoid added after the same scaling), "rotary" (rotary q/k, no scaling),
        "none".
    causal / chunk_size: chunk_size c > 0 lets frame i see frames j < (i // c + 1) * c;
        `causal` alone means c = 1; neither means full attention.
    """

    input_size: int = 80
    d_model: int = 256
    n_heads: int = 4
    ffn_dim: int = 1024
    n_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    positional_dropout: float = 0.1
    input_layer: Literal["linear", "linear_legacy", "conv2d2", "conv2d4", "conv1d2", "conv1d4", "none"] = "linear"
    pos_enc: Literal["rel_pos", "rotary", "abs", "none"] = "rel_pos"
    layer: Literal["transformer", "conformer"] = "transformer"
    macaron: bool = False
    conv_module: bool = False
    conv_kernel: int = 15
    rotary_theta: float = 10000.0
    norm_eps: float = 1e-12
    causal: bool = False
    chunk_size: int = 0
    max_len: int = 5000

    @property
    def attention_chunk(self) -> int:
        """Chunk size of the attention mask: 0 = full attention, 1 = causal."""
        return self.chunk_size if self.chunk_size > 0 else int(self.causal)


# Parameter names of ESPnet/WeNet-style encoder checkpoints -> this module's names.
# Applied as substring replacements, in order, to the part of a key below the encoder.
ESPNET_ENCODER_RENAMES: tuple[tuple[str, str], ...] = (
    ("embed.out.0.", "input_layer.linear."),
    ("embed.out.1.", "input_layer.norm."),
    ("encoders.", "layers."),
    ("self_attn.", "attn."),
    ("feed_forward_macaron.", "ff_macaron."),
    ("feed_forward.", "ff."),
    ("norm_mha.", "norm_attn."),
    ("norm1.", "norm_attn."),
    ("norm2.", "norm_ff."),
)


def rename_espnet_encoder_key(key: str) -> str:
    """Map one ESPnet-style encoder parameter name (without the encoder prefix)."""
    for old, new in ESPNET_ENCODER_RENAMES:
        key = key.replace(old, new)
    return key


class LinearInput(nn.Module):
    """Linear -> LayerNorm (eps 1e-5) -> dropout [-> ReLU for the legacy variant]."""

    def __init__(self, input_size: int, d_model: int, dropout: float, relu: bool):
        super().__init__()
        self.linear = nn.Linear(input_size, d_model)
        self.norm = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.relu = relu

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.dropout(self.norm(self.linear(x)))
        return (F.relu(x) if self.relu else x), lengths


class Conv2dSubsampling(nn.Module):
    """Subsample (batch, time, feat) by 2 or 4 in time with 3x3 convolutions + ReLU.

    Every convolution pads by 1, so the output has ceil(T / factor) frames, and padded
    frames are zeroed between convolutions so that an item's output does not depend on
    how much padding its batch adds.
    """

    def __init__(self, input_size: int, d_model: int, factor: int):
        super().__init__()
        strides = (2, 2) if factor == 4 else (2, 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else d_model, d_model, 3, stride=s, padding=1) for i, s in enumerate(strides))
        freq = input_size
        for s in strides:
            freq = (freq - 1) // s + 1
        self.linear = nn.Linear(d_model * freq, d_model)
        self.strides = strides

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x: (batch, time, feat) -> (batch, ceil(time/factor), d_model), new lengths."""
        h = x.unsqueeze(1)
        for conv, stride in zip(self.convs, self.strides):
            h = h * lengths_to_mask(lengths, h.size(2))[:, None, :, None]
            h = F.relu(conv(h))
            lengths = torch.div(lengths - 1, stride, rounding_mode="floor") + 1
        h = h * lengths_to_mask(lengths, h.size(2))[:, None, :, None]
        return self.linear(h.transpose(1, 2).flatten(2)), lengths


class Conv1dSubsampling(nn.Module):
    """Subsample (batch, time, feat) by 2 or 4 in time, as Whisper's front end does: a
    kernel-3 convolution over all mel bins, then one (or two) stride-2 convolutions,
    each followed by GELU.

    The 2-D subsampler convolves every (time, frequency) cell with d_model channels, which
    dominates a small encoder's cost; this treats the mel bins as channels. Output length
    ceil(T / factor); padded frames are zeroed between convolutions, as in
    `Conv2dSubsampling`.
    """

    def __init__(self, input_size: int, d_model: int, factor: int):
        super().__init__()
        strides = (1, 2, 2) if factor == 4 else (1, 2)
        self.convs = nn.ModuleList(
            nn.Conv1d(input_size if i == 0 else d_model, d_model, 3, stride=s, padding=1)
            for i, s in enumerate(strides))
        self.strides = strides

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x: (batch, time, feat) -> (batch, ceil(time/factor), d_model), new lengths."""
        h = x.transpose(1, 2)
        for conv, stride in zip(self.convs, self.strides):
            h = h * lengths_to_mask(lengths, h.size(2))[:, None, :]
            h = F.gelu(conv(h))
            lengths = torch.div(lengths - 1, stride, rounding_mode="floor") + 1
        h = h * lengths_to_mask(lengths, h.size(2))[:, None, :]
        return h.transpose(1, 2), lengths


class FeedForward(nn.Module):
    """w_2(dropout(act(w_1 x)))."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: nn.Module):
        super().__init__()
        self.w_1 = nn.Linear(d_model, ffn_dim)
        self.w_2 = nn.Linear(ffn_dim, d_model)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConvolutionModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise, LayerNorm, SiLU, pointwise.

    Causal encoders pad the depthwise convolution on the left only.
    """

    def __init__(self, d_model: int, kernel: int, causal: bool):
        super().__init__()
        if not causal and kernel % 2 == 0:
            raise ValueError(f"a non-causal convolution module needs an odd kernel, got {kernel}")
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)
        self.padding = (kernel - 1, 0) if causal else ((kernel - 1) // 2, (kernel - 1) // 2)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x: (batch, time, d_model), valid: (batch, time) -> (batch, time, d_model)."""
        h = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        # Zero the padded frames right before the depthwise convolution so that they
        # look like the convolution's own zero padding.
        h = self.depthwise_conv(F.pad(h.masked_fill(~valid[:, None], 0.0), self.padding))
        h = F.silu(self.norm(h.transpose(1, 2))).transpose(1, 2)
        return self.pointwise_conv2(h).transpose(1, 2)


class EncoderLayer(nn.Module):
    """One pre-norm transformer or conformer layer (see the module docstring)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        conformer = cfg.layer == "conformer"
        if cfg.pos_enc == "rel_pos":
            self.attn = RelPositionMultiHeadAttention(d, cfg.n_heads, cfg.attention_dropout)
        else:
            rotary = RotaryEmbedding(d // cfg.n_heads, cfg.rotary_theta) if cfg.pos_enc == "rotary" else None
            self.attn = MultiHeadAttention(d, cfg.n_heads, dropout=cfg.attention_dropout, rotary=rotary)
        activation = nn.SiLU() if conformer else nn.ReLU()
        self.norm_attn = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ff = FeedForward(d, cfg.ffn_dim, cfg.dropout, activation)
        self.norm_ff = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ff_macaron = self.norm_ff_macaron = self.conv = self.norm_conv = self.norm_final = None
        if conformer and cfg.macaron:
            self.ff_macaron = FeedForward(d, cfg.ffn_dim, cfg.dropout, activation)
            self.norm_ff_macaron = nn.LayerNorm(d, eps=cfg.norm_eps)
        if conformer and cfg.conv_module:
            self.conv = ConvolutionModule(d, cfg.conv_kernel, cfg.attention_chunk > 0)
            self.norm_conv = nn.LayerNorm(d, eps=cfg.norm_eps)
            self.norm_final = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ff_scale = 0.5 if self.ff_macaron is not None else 1.0
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, valid: Tensor, pos_emb: Tensor | None = None,
                positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """x: (batch, time, d_model); mask: (batch, time, keys); valid: (batch, time)."""
        if self.ff_macaron is not None:
            x = x + 0.5 * self.dropout(self.ff_macaron(self.norm_ff_macaron(x)))
        extra = {} if pos_emb is None else {"pos_emb": pos_emb}
        x = x + self.dropout(self.attn(self.norm_attn(x), mask, positions=positions, cache=cache, **extra))
        if self.conv is not None:
            if cache is not None:
                raise ValueError("cached decoding does not support the conformer convolution module")
            x = x + self.dropout(self.conv(self.norm_conv(x), valid))
        x = x + self.ff_scale * self.dropout(self.ff(self.norm_ff(x)))
        return x if self.norm_final is None else self.norm_final(x)


class Encoder(nn.Module):
    """Input layer -> positional encoding -> `n_layers` layers -> after_norm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        if cfg.input_layer in ("linear", "linear_legacy"):
            self.input_layer = LinearInput(cfg.input_size, d, cfg.dropout, cfg.input_layer == "linear_legacy")
        elif cfg.input_layer in ("conv2d2", "conv2d4"):
            self.input_layer = Conv2dSubsampling(cfg.input_size, d, int(cfg.input_layer[-1]))
        elif cfg.input_layer in ("conv1d2", "conv1d4"):
            self.input_layer = Conv1dSubsampling(cfg.input_size, d, int(cfg.input_layer[-1]))
        elif cfg.input_size != d:
            raise ValueError(f"input_layer 'none' needs input_size == d_model, got {cfg.input_size} and {d}")
        else:
            self.input_layer = None
        if cfg.pos_enc == "rel_pos":
            self.pos_enc = RelPositionalEncoding(d, cfg.positional_dropout, cfg.max_len)
        elif cfg.pos_enc == "abs":
            self.pos_enc = PositionalEncoding(d, cfg.positional_dropout, cfg.max_len)
        else:
            self.pos_enc = nn.Dropout(cfg.positional_dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def _positions(self, x: Tensor, positions: Tensor | None, table_len: int | None):
        """Apply the positional encoding; returns (x, pos_emb or None)."""
        if isinstance(self.pos_enc, RelPositionalEncoding):
            x, pos_emb = self.pos_enc(x, table_len)
            return x, pos_emb
        if isinstance(self.pos_enc, PositionalEncoding):
            return self.pos_enc(x, positions), None
        return self.pos_enc(x), None

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x: (batch, time, input_size), lengths: (batch,) -> (batch, time', d_model), lengths'."""
        if self.input_layer is not None:
            x, lengths = self.input_layer(x, lengths)
        x, pos_emb = self._positions(x, None, None)
        mask = padding_and_chunk_mask(lengths, x.size(1), self.cfg.attention_chunk)
        valid = lengths_to_mask(lengths, x.size(1))
        for layer in self.layers:
            x = layer(x, mask, valid, pos_emb)
        return self.after_norm(x), lengths

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> list[KVCache]:
        """One preallocated `KVCache` per layer for `max_len` positions."""
        if max_len > self.cfg.max_len:
            raise ValueError(f"cache of {max_len} positions exceeds the encoder's max_len {self.cfg.max_len}")
        heads, head_dim = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
        return [KVCache(batch, heads, max_len, head_dim, device, dtype) for _ in self.layers]

    def forward_step(self, x: Tensor, cache: list[KVCache], lengths: Tensor | None = None) -> Tensor:
        """Encode new frames appended after each row's cached ones.

        x: (batch, n, input_size); lengths: (batch,) how many of the n frames are real
        per row (default all). Returns (batch, n, d_model). Outputs equal those of
        `forward` on the whole sequence for causal attention, and for chunked attention
        when frames arrive in whole chunks.
        """
        if isinstance(self.input_layer, (Conv2dSubsampling, Conv1dSubsampling)):
            raise ValueError("cached decoding does not support convolutional input layers")
        n = x.size(1)
        fill = cache[0].fill
        if lengths is None:
            lengths = torch.full_like(fill, n)
        positions = fill[:, None] + torch.arange(n, device=x.device)
        if self.input_layer is not None:
            x, _ = self.input_layer(x, lengths)
        x, pos_emb = self._positions(x, positions, cache[0].max_len)
        keys = torch.arange(int(positions.max()) + 1, device=x.device)
        mask = (keys < (fill + lengths)[:, None, None]).expand(-1, n, -1)
        if self.cfg.attention_chunk > 0:
            mask = mask & positions_chunk_mask(positions, keys, self.cfg.attention_chunk)
        mask = ensure_visible(mask)
        valid = lengths_to_mask(lengths, n)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, mask, valid, pos_emb, positions, layer_cache)
            layer_cache.advance(lengths)
        return self.after_norm(x)
