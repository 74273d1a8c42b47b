"""Discriminators of the vocoder GAN: multi-period (HiFi-GAN) and multi-resolution
spectrogram (UnivNet). Each sub-discriminator returns a score map and the feature maps
of its layers (for the feature-matching loss)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cosy.vocoder.hift import weight_norm

Features = list[torch.Tensor]


@dataclass
class DiscriminatorConfig:
    periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    period_channels: list[int] = field(default_factory=lambda: [32, 128, 512, 1024, 1024])
    # (n_fft, hop, window) per spectrogram discriminator
    resolutions: list[list[int]] = field(default_factory=lambda: [[1024, 120, 600], [2048, 240, 1200],
                                                                  [512, 50, 240]])
    resolution_channels: int = 32


class ConvStack2d(nn.Module):
    """Weight-normed Conv2d layers with LeakyReLU(0.1), then a 1-channel score conv.
    `layers` are (c_in, c_out, kernel, stride, padding); input `(batch, 1, h, w)`."""

    def __init__(self, layers: list[tuple], post: tuple):
        super().__init__()
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(*spec)) for spec in layers)
        self.post = weight_norm(nn.Conv2d(*post))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.post(x)
        features.append(x)
        return x.flatten(1), features


class PeriodDiscriminator(nn.Module):
    """Waveform folded into `(batch, 1, samples / period, period)` columns, 5x1 convs."""

    def __init__(self, period: int, channels: list[int]):
        super().__init__()
        self.period = period
        sizes = [1] + channels
        layers = [(sizes[i], sizes[i + 1], (5, 1), (3 if i < len(channels) - 1 else 1, 1), (2, 0))
                  for i in range(len(channels))]
        self.stack = ConvStack2d(layers, (channels[-1], 1, (3, 1), 1, (1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, Features]:
        rest = -wave.shape[-1] % self.period
        x = F.pad(wave[:, None, :], (0, rest), mode="reflect")
        return self.stack(x.view(x.shape[0], 1, -1, self.period))


class SpectrogramDiscriminator(nn.Module):
    """Linear magnitude spectrogram `(batch, 1, frames, bins)` at one STFT resolution."""

    def __init__(self, n_fft: int, hop: int, window: int, channels: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(window), persistent=False)
        c = channels
        layers = [(1, c, (3, 9), 1, (1, 4))] + [(c, c, (3, 9), (1, 2), (1, 4))] * 3 + [(c, c, (3, 3), 1, (1, 1))]
        self.stack = ConvStack2d(layers, (c, 1, (3, 3), 1, (1, 1)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, Features]:
        spec = torch.stft(wave, self.n_fft, self.hop, self.window.shape[0], self.window, return_complex=True)
        return self.stack(spec.abs().transpose(1, 2)[:, None])


class Discriminator(nn.Module):
    """All sub-discriminators: waveform `(batch, samples)` -> (scores, features) lists."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, cfg.period_channels) for p in cfg.periods)
        self.resolutions = nn.ModuleList(SpectrogramDiscriminator(n, h, w, cfg.resolution_channels)
                                         for n, h, w in cfg.resolutions)

    def forward(self, wave: torch.Tensor) -> tuple[list[torch.Tensor], list[Features]]:
        scores, features = [], []
        for sub in [*self.periods, *self.resolutions]:
            score, feats = sub(wave)
            scores.append(score)
            features.append(feats)
        return scores, features
