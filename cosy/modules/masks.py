"""Boolean attention masks. Everywhere in cosy, True means "may attend" / "valid"."""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Valid-frame mask `(batch, time)` from `lengths: (batch,)`."""
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def causal_mask(size: int, device: torch.device | None = None) -> Tensor:
    """`(size, size)` mask where query i sees keys j <= i."""
    return chunk_mask(size, 1, device=device)


def chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
               device: torch.device | None = None) -> Tensor:
    """`(size, size)` mask of chunked attention.

    Query i sees key j iff j < (i // c + 1) * c, i.e. its own chunk and every earlier
    one; with `num_left_chunks` >= 0 only that many earlier chunks stay visible.
    """
    pos = torch.arange(size, device=device)
    return positions_chunk_mask(pos, pos, chunk_size, num_left_chunks)


def positions_chunk_mask(query_pos: Tensor, key_pos: Tensor, chunk_size: int,
                         num_left_chunks: int = -1) -> Tensor:
    """Chunk rule for arbitrary absolute positions: `(..., Tq)` x `(Tk,)` -> `(..., Tq, Tk)`.

    Used by cached decoding, where the query sits at a position n > 0 of the sequence.
    """
    chunk = torch.div(query_pos, chunk_size, rounding_mode="floor")
    keys = key_pos.view(*([1] * query_pos.dim()), -1)
    mask = keys < ((chunk + 1) * chunk_size).unsqueeze(-1)
    if num_left_chunks >= 0:
        mask = mask & (keys >= ((chunk - num_left_chunks).clamp(min=0) * chunk_size).unsqueeze(-1))
    return mask


def padding_and_chunk_mask(lengths: Tensor, max_len: int, chunk_size: int = 0,
                           num_left_chunks: int = -1) -> Tensor:
    """Self-attention mask `(batch, time, time)` combining key padding and chunking.

    `chunk_size` 0 means full attention, 1 plain causal attention. A query row left
    without any visible key (only possible for an empty item) is made fully visible so
    that the softmax stays finite; its output is padding anyway.
    """
    keys = lengths_to_mask(lengths, max_len)[:, None, :]
    if chunk_size > 0:
        mask = keys & chunk_mask(max_len, chunk_size, num_left_chunks, lengths.device)[None]
    else:
        mask = keys.expand(-1, max_len, -1)
    return ensure_visible(mask)


def ensure_visible(mask: Tensor) -> Tensor:
    """Turn rows without any True into all-True rows (see `padding_and_chunk_mask`)."""
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty
