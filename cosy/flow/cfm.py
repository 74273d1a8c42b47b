"""Optimal-transport conditional flow matching: training loss and Euler solver."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

# (x, mask, mu, t, spks, cond) -> velocity, all batched as in Estimator.forward
VectorField = Callable[..., torch.Tensor]


@dataclass
class CFMConfig:
    sigma_min: float = 1e-6
    cfg_dropout: float = 0.2  # training: share of samples without mu/spk/cond
    voice_dropout: float = 0.0  # training: share of further samples keeping mu, without spk/cond
    prompt_prob: float = 0.5  # training: share of samples given a prompt prefix as cond
    prompt_max: float = 0.3  # training: longest prefix as a share of the frames
    steps: int = 10
    guidance: float = 0.7  # v = (1 + g) v_cond - g v_uncond
    voice_guidance: float = 0.0  # adds w (v_cond - v(mu only)); needs voice_dropout in training
    schedule: Literal["cosine", "linear"] = "cosine"


def warp(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """Map uniform times to the schedule's times (cosine: 1 - cos(t pi / 2))."""
    return 1 - torch.cos(t * 0.5 * math.pi) if schedule == "cosine" else t


def cfm_loss(estimator: VectorField, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor,
             spks: torch.Tensor, cond: torch.Tensor, cfg: CFMConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked MSE between the estimated and the OT path velocity.

    x1, mu, cond (batch, n_mels, frames); mask (batch, 1, frames); spks (batch, n_mels).
    One uniform draw per sample picks what it loses: below `cfg_dropout` every condition,
    then up to `cfg_dropout + voice_dropout` the speaker and prompt only.
    """
    b = x1.shape[0]
    t = warp(torch.rand(b, 1, 1, device=x1.device, generator=generator), cfg.schedule)
    z = torch.randn(x1.shape, device=x1.device, generator=generator)
    xt = (1 - (1 - cfg.sigma_min) * t) * z + t * x1
    u = x1 - (1 - cfg.sigma_min) * z
    draw = torch.rand(b, device=x1.device, generator=generator)
    keep = (draw >= cfg.cfg_dropout).float()
    keep_voice = (draw >= cfg.cfg_dropout + cfg.voice_dropout).float()
    pred = estimator(xt, mask, mu * keep.view(b, 1, 1), t.view(b), spks * keep_voice.view(b, 1),
                     cond * keep_voice.view(b, 1, 1))
    err = ((pred - u) * mask).square().sum()
    return err / (mask.sum() * x1.shape[1])


def time_grid(steps: int, schedule: str, device: torch.device | None = None) -> torch.Tensor:
    """The steps + 1 solver times from 0 to 1."""
    return warp(torch.linspace(0, 1, steps + 1, device=device), schedule)


def guided(estimator: VectorField, cfg: CFMConfig) -> VectorField:
    """Classifier-free guidance, all rows in one batch: conditional, unconditional and, with
    `voice_guidance`, tokens only (no speaker, no prompt).

    The voice term pushes the output away from the voice the tokens alone imply, toward
    the prompt's: tokens of a tokenizer that hears the speaker otherwise pull unseen voices
    toward the training voice they resemble.
    """
    def field(x, mask, mu, t, spks, cond, **kw):
        b = x.shape[0]
        no_spks, no_cond = torch.zeros_like(spks), torch.zeros_like(cond)
        rows = [(mu, spks, cond), (torch.zeros_like(mu), no_spks, no_cond)]
        if cfg.voice_guidance:
            rows.append((mu, no_spks, no_cond))
        n = len(rows)
        mu_rows, spk_rows, cond_rows = (torch.cat(parts) for parts in zip(*rows))
        out = estimator(torch.cat([x] * n), torch.cat([mask] * n), mu_rows, torch.cat([t] * n), spk_rows, cond_rows,
                        **kw)
        v_cond = out[:b]
        v = (1 + cfg.guidance) * v_cond - cfg.guidance * out[b:2 * b]
        if cfg.voice_guidance:
            v = v + cfg.voice_guidance * (v_cond - out[2 * b:])
        return v
    return field


def euler(field: VectorField, z: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor,
          spks: torch.Tensor, cond: torch.Tensor, cfg: CFMConfig,
          caches: list[dict] | None = None) -> torch.Tensor:
    """Integrate dx/dt = field from noise z (batch, n_mels, frames) at t=0 to t=1.

    t is accumulated step by step and each dt is the gap to the next grid time, as the
    reference does (the float32 rounding of this sum is visible at 1e-6).
    `caches`, one dict per step, carry streaming state of a causal estimator.
    """
    grid = time_grid(cfg.steps, cfg.schedule, z.device)
    x, t, dt = z, grid[0], grid[1] - grid[0]
    for k in range(1, cfg.steps + 1):
        kw = {} if caches is None else {"cache": caches[k - 1]}
        v = field(x, mask, mu, t.expand(x.shape[0]), spks, cond, **kw)
        x = x + dt * v
        t = t + dt
        if k < cfg.steps:
            dt = grid[k + 1] - t
    return x
