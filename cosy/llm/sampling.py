"""Token sampling for the speech-token LM: temperature, top-k / top-p, and
repetition-aware sampling (RAS).

A single draw from probabilities p is argmax_i(p_i / E_i) with E_i independent Exp(1)
variates, which is how torch draws one multinomial sample. Writing it this way lets
tests inject the exponential draws and makes a seeded torch.Generator reproduce
torch.multinomial exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Draws = Callable[[int], Tensor]  # n -> n independent Exp(1) variates


@dataclass
class SamplingConfig:
    """How the next speech token is picked.

    greedy: argmax (first index on ties); the other fields are then ignored.
    temperature: logits are divided by it before the softmax.
    top_k, top_p: nucleus candidates are the most probable tokens, taken in order while
        the probability mass before the next one is < top_p and fewer than top_k are taken.
    window, tau: repetition-aware fallback. If the picked token occurs at least
        window * tau times among the last `window` tokens, it is banned and the token
        is drawn from the whole distribution instead. tau 0 disables the fallback.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 25
    top_p: float = 0.8
    window: int = 10
    tau: float = 0.1


def exponential_draws(generator: torch.Generator | None = None) -> Draws:
    """Exp(1) variates from `generator` (the global torch RNG when None)."""
    return lambda n: torch.empty(n).exponential_(generator=generator)


def draw(probs: Tensor, draws: Draws) -> int:
    """One index of `probs` (not necessarily normalised) drawn with `draws`."""
    return int(torch.argmax(probs / draws(probs.numel())))


def nucleus(probs: Tensor, top_p: float, top_k: int) -> tuple[Tensor, Tensor]:
    """Candidate ids and their probabilities, most probable first (stable for ties).

    The walk takes the next token while the float32 mass of those already taken is
    below top_p, so the token that crosses top_p is included.
    """
    sorted_probs, ids = torch.sort(probs, descending=True, stable=True)
    cumulative = torch.cumsum(sorted_probs, 0)
    before = torch.cat([cumulative.new_zeros(1), cumulative[:-1]])
    keep = int(((before < top_p) & (torch.arange(len(probs)) < top_k)).sum())
    return ids[:keep], sorted_probs[:keep]


def sample(logits: Tensor, history: Sequence[int], cfg: SamplingConfig, draws: Draws) -> int:
    """Pick one token from `logits: (vocab,)` (log-probabilities or raw logits).

    history: the tokens decoded so far for this sequence (most recent last).
    """
    if cfg.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / cfg.temperature
    probs = torch.softmax(scores, 0)
    ids, cand_probs = nucleus(probs, cfg.top_p, cfg.top_k)
    token = int(ids[draw(cand_probs, draws)])
    recent = list(history[-cfg.window:]) if cfg.window > 0 else []
    if cfg.tau > 0 and recent.count(token) >= cfg.window * cfg.tau:
        scores = scores.clone()
        scores[token] = float("-inf")
        token = draw(torch.softmax(scores, 0), draws)
    return token
