"""Positional encodings: ESPnet-style relative table, rotary, sinusoidal absolute."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _frequencies(dim: int) -> Tensor:
    """omega_m = exp(-2m ln(10000) / dim), in float32 as the reference computes it."""
    return torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))


def _interleaved_sinusoid(positions: Tensor, dim: int) -> Tensor:
    """`(n,)` float positions -> `(n, dim)` with sin at even and cos at odd components."""
    angles = positions[:, None].float() * _frequencies(dim)[None, :]
    table = torch.zeros(len(positions), dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class PositionalEncoding(nn.Module):
    """Absolute sinusoid added to the input after scaling it by sqrt(d_model)."""

    def __init__(self, d_model: int, dropout: float = 0.0, max_len: int = 5000):
        super().__init__()
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", _interleaved_sinusoid(torch.arange(max_len), d_model), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: (batch, time, d_model); positions: (batch, time) absolute indices, default 0..T-1."""
        pe = self.pe[: x.size(1)][None] if positions is None else self.pe[positions]
        return self.dropout(x * self.xscale + pe.to(x.dtype))


class RelPositionalEncoding(nn.Module):
    """ESPnet "rel_pos_espnet" encoding: scale the input, hand out the relative table.

    The table holds PE(r) for r = L-1, L-2, ..., -(L-1) (row k <-> r = L-1-k), with
    PE(r)[2m] = sin(r w_m), PE(r)[2m+1] = cos(r w_m). `forward` returns the 2T-1 rows of
    a length-T sequence; `table(n)` the rows r = n-1 ... -(n-1) for any n <= max_len,
    which cached decoding uses once per cache so that the attention can project it once.
    """

    def __init__(self, d_model: int, dropout: float = 0.0, max_len: int = 5000):
        super().__init__()
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        self.dropout = nn.Dropout(dropout)
        rel = torch.arange(max_len - 1, -max_len, -1)
        self.register_buffer("pe", _interleaved_sinusoid(rel, d_model), persistent=False)

    def table(self, n: int) -> Tensor:
        """Rows r = n-1 ... -(n-1): (1, 2n-1, d_model)."""
        if n > self.max_len:
            raise ValueError(f"sequence of {n} positions exceeds the positional table ({self.max_len})")
        centre = self.max_len - 1
        return self.pe[centre - n + 1: centre + n][None]

    def forward(self, x: Tensor, n_positions: int | None = None) -> tuple[Tensor, Tensor]:
        """x: (batch, time, d_model) -> (scaled x, pos_emb (1, 2n-1, d_model)), n = time
        unless `n_positions` asks for a longer table (cached decoding)."""
        pos_emb = self.table(n_positions or x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, "rotate half" convention.

    Dimension i is paired with i + head_dim/2 and turns at frequency theta^(-2i/head_dim).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x: (batch, heads, time, head_dim) at positions (batch, time) or (time,)."""
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        if angles.dim() == 3:
            angles = angles[:, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        half = x.size(-1) // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
