"""Shared check for models that the recipes train under bf16 autocast."""

from __future__ import annotations

import torch
from torch import nn


def assert_bf16_tracks_fp32(model: nn.Module, batch: dict, seed: int = 0) -> None:
    """One forward/backward pass in fp32 and one under CPU bf16 autocast, with the same
    random draws: the losses agree to 2%, every gradient stays fp32 and finite, and the
    whole gradient points the way of the fp32 one (cosine >= 0.99). Single weights may
    drift more: bf16 keeps 8 bits of mantissa, and the small gradients that reach the
    first layers through a deep stack lose the most (cosines of 0.93 and up seen)."""
    losses, grads = [], []
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    fp32, bf16 = losses
    assert abs(bf16 - fp32) <= 0.02 * abs(fp32), (fp32, bf16)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    flat = [torch.cat([g.flatten() for g in each.values()]) for each in grads]
    cosine = torch.nn.functional.cosine_similarity(*flat, dim=0)
    assert cosine >= 0.99, float(cosine)
