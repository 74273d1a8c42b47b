"""Autoregressive decoding of speech tokens, batched, cached or not, streaming.

Rows of a batch may have different prompt lengths: inputs are right-padded and every
row keeps its own position, so each item's logits are those it would have alone. With a
seed, the rows draw from one generator in turn, so a row's samples depend on the rows
decoded beside it (greedy decoding does not).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from cosy.errors import CosyError
from cosy.llm.model import LLM
from cosy.llm.sampling import SamplingConfig, exponential_draws, sample


class Decoder:
    """Incremental LM state for a batch.

    With `use_cache` the LM keeps a preallocated KV cache and each step runs one new
    row per item; without it every step re-runs the LM over the whole sequence (the
    slow baseline, kept for benchmarks and tests).
    """

    def __init__(self, model: LLM, x: Tensor, lengths: Tensor, capacity: int, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        rows = torch.arange(x.size(0), device=x.device)
        if use_cache:
            self.cache = model.lm.new_cache(x.size(0), capacity, x.device, x.dtype)
            hidden = model.lm.forward_step(x, self.cache, lengths)
        else:
            self.buffer = x.new_zeros(x.size(0), capacity, x.size(2))
            self.buffer[:, : x.size(1)] = x
            self.lengths = lengths.clone()
            hidden = model.hidden(x, lengths)
        self.last = hidden[rows, lengths - 1]

    def logits(self) -> Tensor:
        """(batch, speech_vocab + 1) logits for the next token of every row."""
        return self.model.head(self.last)

    def push(self, tokens: Tensor, active: Tensor) -> None:
        """Append the embeddings of `tokens: (batch,)` to the rows where `active` is True."""
        emb = self.model.speech_embedding(tokens.clamp(min=0))[:, None]
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.use_cache:
            hidden = self.model.lm.forward_step(emb, self.cache, active.long())[:, 0]
        else:
            self.buffer[rows[active], self.lengths[active]] = emb[active, 0]
            self.lengths = self.lengths + active.long()
            hidden = self.model.hidden(self.buffer[:, : int(self.lengths.max())], self.lengths)[rows, self.lengths - 1]
        self.last = torch.where(active[:, None], hidden, self.last)


@torch.no_grad()
def stream(model: LLM, text: Tensor, text_len: Tensor, prompt_text: Tensor | None = None,
           prompt_text_len: Tensor | None = None, prompt_speech: Tensor | None = None,
           prompt_speech_len: Tensor | None = None, embedding: Tensor | None = None,
           sampling: SamplingConfig | None = None, seed: int | None = None,
           use_cache: bool = True) -> Iterator[Tensor]:
    """Decode speech tokens, yielding each step's tokens as soon as they are drawn.

    Token tensors are right-padded (batch, time) with (batch,) lengths (see
    `LLM.prepare`). Every yield is a (batch,) long tensor: the new token of each row, or
    -1 for rows that have finished (eos drawn or the maximum length reached); eos itself
    is never yielded. Row b draws between floor(min_ratio * text_len[b]) and
    floor(max_ratio * text_len[b]) tokens. With `seed`, the draws come from a private
    generator and decoding is reproducible.
    """
    cfg = model.cfg
    sampling = sampling or cfg.sampling
    draws = exponential_draws(torch.Generator().manual_seed(seed) if seed is not None else None)
    x, lengths = model.prepare(text, text_len, prompt_text, prompt_text_len, prompt_speech, prompt_speech_len,
                               embedding)
    min_len = torch.floor(text_len.double() * cfg.min_token_text_ratio).long()
    max_len = torch.floor(text_len.double() * cfg.max_token_text_ratio).long()
    room = model.max_positions - int(lengths.max())
    if room <= int(min_len.max()):
        raise CosyError(f"text too long: {int(lengths.max())} input positions leave room for {max(room, 0)} "
                        f"speech tokens, fewer than the minimum of {int(min_len.max())}")
    max_len = max_len.clamp(max=room)
    decoder = Decoder(model, x, lengths, int(lengths.max()) + int(max_len.max()), use_cache)
    history: list[list[int]] = [[] for _ in range(len(text_len))]
    active = max_len > 0
    for step in range(int(max_len.max())):
        logp = torch.log_softmax(decoder.logits().float(), dim=-1)
        logp[step < min_len, model.eos] = -math.inf
        tokens = torch.full_like(text_len, -1)
        for b in torch.nonzero(active).flatten().tolist():
            token = sample(logp[b].cpu(), history[b], sampling, draws)
            if token == model.eos:
                active[b] = False
                continue
            tokens[b] = token
            history[b].append(token)
            active[b] = len(history[b]) < max_len[b]
        if (tokens >= 0).any():
            yield tokens
        if not active.any():
            return
        decoder.push(tokens, active)


def generate(model: LLM, text: Tensor, text_len: Tensor, *args, **kwargs) -> list[list[int]]:
    """All tokens of every row (see `stream` for the arguments)."""
    rows: list[list[int]] = [[] for _ in range(len(text_len))]
    for tokens in stream(model, text, text_len, *args, **kwargs):
        for b, token in enumerate(tokens.tolist()):
            if token >= 0:
                rows[b].append(token)
    return rows
