"""GAN losses of the vocoder: least-squares adversarial terms and feature matching.
(The mel and f0 L1 terms are plain `F.l1_loss` in the model.)"""

from __future__ import annotations

import torch

from cosy.vocoder.discriminators import Features


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: push real scores to 1 and generated ones to 0, summed over sub-discriminators."""
    return sum(((1 - r) ** 2).mean() + (f ** 2).mean() for r, f in zip(real, fake))


def generator_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: push the scores of generated audio to 1."""
    return sum(((1 - f) ** 2).mean() for f in fake)


def feature_matching_loss(real: list[Features], fake: list[Features]) -> torch.Tensor:
    """L1 between the discriminator's feature maps of real and generated audio."""
    return sum((r.detach() - f).abs().mean() for rs, fs in zip(real, fake) for r, f in zip(rs, fs))
