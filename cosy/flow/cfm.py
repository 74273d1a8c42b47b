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
    prompt_prob: float = 0.5  # training: share of samples given a prompt prefix as cond
    prompt_max: float = 0.3  # training: longest prefix as a share of the frames
    steps: int = 10
    guidance: float = 0.7  # v = (1 + g) v_cond - g v_uncond
    schedule: Literal["cosine", "linear"] = "cosine"


def warp(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """Map uniform times to the schedule's times (cosine: 1 - cos(t pi / 2))."""
    return 1 - torch.cos(t * 0.5 * math.pi) if schedule == "cosine" else t


def cfm_loss(estimator: VectorField, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor,
             spks: torch.Tensor, cond: torch.Tensor, cfg: CFMConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked MSE between the estimated and the OT path velocity.

    x1, mu, cond (batch, n_mels, frames); mask (batch, 1, frames); spks (batch, n_mels).
    """
    b = x1.shape[0]
    t = warp(torch.rand(b, 1, 1, device=x1.device, generator=generator), cfg.schedule)
    z = torch.randn(x1.shape, device=x1.device, generator=generator)
    xt = (1 - (1 - cfg.sigma_min) * t) * z + t * x1
    u = x1 - (1 - cfg.sigma_min) * z
    keep = (torch.rand(b, device=x1.device, generator=generator) >= cfg.cfg_dropout).float()
    pred = estimator(xt, mask, mu * keep.view(b, 1, 1), t.view(b), spks * keep.view(b, 1),
                     cond * keep.view(b, 1, 1))
    err = ((pred - u) * mask).square().sum()
    return err / (mask.sum() * x1.shape[1])


def time_grid(steps: int, schedule: str, device: torch.device | None = None) -> torch.Tensor:
    """The steps + 1 solver times from 0 to 1."""
    return warp(torch.linspace(0, 1, steps + 1, device=device), schedule)


def guided(estimator: VectorField, guidance: float) -> VectorField:
    """Classifier-free guidance: one batch of conditional and unconditional rows."""
    def field(x, mask, mu, t, spks, cond, **kw):
        b = x.shape[0]
        out = estimator(torch.cat([x, x]), torch.cat([mask, mask]),
                        torch.cat([mu, torch.zeros_like(mu)]), torch.cat([t, t]),
                        torch.cat([spks, torch.zeros_like(spks)]),
                        torch.cat([cond, torch.zeros_like(cond)]), **kw)
        return (1 + guidance) * out[:b] - guidance * out[b:]
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
