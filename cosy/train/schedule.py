"""Optimisers and learning-rate schedules from config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from cosy.errors import CosyError


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    """Learning-rate factor over optimiser steps, all with a linear warm-up first.

    constant: 1 after warm-up. inverse_sqrt: peaks at the end of warm-up, then
    sqrt(warmup / step) (Noam). cosine: decays to `min_factor` at `total_steps`
    (0 = the run's max_steps).
    """

    name: Literal["constant", "inverse_sqrt", "cosine"] = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_factor: float = 0.0


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def lr_factor(config: SchedulerConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based)."""
    step += 1
    warmup = config.warmup_steps
    if warmup and step <= warmup:
        return step / warmup
    if config.name == "inverse_sqrt":
        return math.sqrt(warmup / step) if warmup else 1.0 / math.sqrt(step)
    if config.name == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return config.min_factor + (1 - config.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = config.total_steps or max_steps
    if config.name == "cosine" and total <= 0:
        raise CosyError("train.scheduler.name=cosine needs train.scheduler.total_steps or train.max_steps")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, total))
