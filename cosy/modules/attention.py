"""Multi-head self-attention with a preallocated key/value cache.

Masks are boolean, True = may attend, shaped (batch, time_q, time_k) or broadcastable
to it (e.g. (batch, 1, time_k) for key padding only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosy.modules.positional import RotaryEmbedding


class KVCache:
    """Keys and values of one attention layer, allocated once for `max_len` positions.

    k, v: (batch, heads, max_len, head_dim). `fill[b]` counts the valid positions of
    row b; rows may differ (items of different lengths decoded together). A step writes
    its new keys in place at the given positions, so the prefix is never copied or
    recomputed. `pos_proj` / `pos_band` let a relative-position layer keep its projected
    position table for the lifetime of the cache.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.fill = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos_proj: Tensor | None = None
        self.pos_band = (0, 0)  # rows [lo, hi) of pos_proj that hold projected values

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def write(self, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v: (batch, heads, n, head_dim) at positions (batch, n).

        Returns the cached keys and values of positions 0 .. max(positions), views of the
        preallocated storage. Does not change `fill` (the caller knows which of the new
        positions are valid, see `advance`).
        """
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full (needs {end})")
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:, :, :end], self.v[:, :, :end]

    def advance(self, count: Tensor | int) -> None:
        """Mark `count` more positions (per row, or for all rows) as valid."""
        self.fill = self.fill + count


class MultiHeadAttention(nn.Module):
    """Self-attention with q/k/v/out projections, optional rotary positions.

    The inner width n_heads * head_dim may differ from d_model (as in the flow
    estimator's 8 x 64 heads on 256 channels).
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, dropout: float = 0.0,
                 qkv_bias: bool = True, out_bias: bool = True, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim or d_model // n_heads
        inner = n_heads * self.head_dim
        if head_dim is None and inner != d_model:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.linear_q = nn.Linear(d_model, inner, bias=qkv_bias)
        self.linear_k = nn.Linear(d_model, inner, bias=qkv_bias)
        self.linear_v = nn.Linear(d_model, inner, bias=qkv_bias)
        self.linear_out = nn.Linear(inner, d_model, bias=out_bias)
        self.dropout = dropout
        self.rotary = rotary

    def _heads(self, x: Tensor) -> Tensor:
        """(batch, time, heads*head_dim) -> (batch, heads, time, head_dim)."""
        return x.view(x.size(0), x.size(1), self.n_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor, positions: Tensor | None, cache: KVCache | None):
        """Heads of q, k, v and the query positions; k, v cover every cached key."""
        q, k, v = self._heads(self.linear_q(x)), self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        if positions is None:
            if cache is not None:
                raise ValueError("cached attention needs the absolute positions of the new queries")
            positions = torch.arange(x.size(1), device=x.device)[None]
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.write(k, v, positions.expand(x.size(0), -1))
        return q, k, v, positions

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Softmax attention and output projection -> (batch, time, d_model)."""
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        return self.linear_out(out.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """x: (batch, time, d_model); positions: (batch, time) absolute query positions,
        required with a cache (then the mask covers keys 0 .. max position)."""
        q, k, v, _ = self._project(x, positions, cache)
        bias = None if mask is None else mask.unsqueeze(1)
        return self._attend(q, k, v, bias)


class RelPositionMultiHeadAttention(MultiHeadAttention):
    """Attention with ESPnet relative positions (Transformer-XL style biases).

    logit(i, j) = [(q_i + u) . k_j + (q_i + v') . p(i - j)] / sqrt(head_dim), with
    p = linear_pos(PE) (no bias) and learned per-head u = pos_bias_u, v' = pos_bias_v.
    `pos_emb` is a table of rows r = c, c-1, ..., -c (c >= every |i - j|), as given by
    `RelPositionalEncoding`. With a cache, each table row is projected at most once per
    cache and reused at every later step, so a step costs O(T d) rather than O(T d^2)
    for the positions (the reference re-projects all 2T-1 rows at every step).
    """

    BLOCK = 64  # table rows projected at a time during cached decoding

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__(d_model, n_heads, dropout=dropout)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _project_rows(self, pos_emb: Tensor) -> Tensor:
        """(rows, d_model) -> (heads, rows, head_dim)."""
        return self.linear_pos(pos_emb).view(-1, self.n_heads, self.head_dim).transpose(0, 1)

    def _positions_projected(self, pos_emb: Tensor, first: int, last: int, cache: KVCache | None) -> Tensor:
        """Projected table rows first..last: (heads, last - first + 1, head_dim).

        With a cache, projected rows are kept in it and only rows never seen before are
        projected, in blocks, so a decoding step costs O(head_dim) per new position
        instead of projecting the whole table.
        """
        if cache is None:
            return self._project_rows(pos_emb[0, first: last + 1])
        rows = pos_emb.size(1)
        if cache.pos_proj is None or cache.pos_proj.size(1) != rows:
            cache.pos_proj = pos_emb.new_empty(self.n_heads, rows, self.head_dim)
            cache.pos_band = (first, first)
        lo, hi = cache.pos_band
        new_lo = min(lo, max(0, first - self.BLOCK))
        new_hi = max(hi, min(rows, last + 1 + self.BLOCK))
        if new_lo < lo:
            cache.pos_proj[:, new_lo:lo] = self._project_rows(pos_emb[0, new_lo:lo])
        if new_hi > hi:
            cache.pos_proj[:, hi:new_hi] = self._project_rows(pos_emb[0, hi:new_hi])
        cache.pos_band = (new_lo, new_hi)
        return cache.pos_proj[:, first: last + 1]

    def forward(self, x: Tensor, mask: Tensor | None, pos_emb: Tensor, positions: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """x: (batch, time, d_model); pos_emb: (1, 2c+1, d_model); see `MultiHeadAttention`."""
        q, k, v, positions = self._project(x, positions, cache)
        n_keys = k.size(2)
        centre = (pos_emb.size(1) - 1) // 2
        # Only rows with r in [min(i) - (n_keys - 1), max(i)] can be needed.
        first = centre - int(positions.max())
        last = centre - int(positions.min()) + n_keys - 1
        p = self._positions_projected(pos_emb, first, last, cache)
        scores = torch.matmul(q + self.pos_bias_v[:, None], p.transpose(-1, -2))
        rel = positions[:, :, None] - torch.arange(n_keys, device=x.device)
        index = (centre - first - rel)[:, None].expand(q.size(0), self.n_heads, -1, -1)
        bias = scores.gather(-1, index) / math.sqrt(self.head_dim)
        if mask is not None:
            bias = bias.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return self._attend(q + self.pos_bias_u[:, None], k, v, bias)
