"""The HiFT parts of the generator: f0 predictor, neural-source-filter sine source, STFT pair.

HiFT (the CosyVoice vocoder) drives a HiFi-GAN generator with a harmonic excitation made
from a predicted f0, and lets the generator output a short-time spectrum that an inverse
STFT turns into samples. Shapes follow the channel-first layout `(batch, channels, time)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cosy.audio import _pad_per_utterance
from cosy.modules.masks import lengths_to_mask


def weight_norm(module: nn.Module) -> nn.Module:
    """Weight normalisation in PyTorch's parametrisation form (g = original0, v = original1)."""
    return nn.utils.parametrizations.weight_norm(module)


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x * mask` where a mask is given: zeroing padded steps before a convolution makes a
    padded batch item see what it would see alone."""
    return x if mask is None else x * mask


@dataclass
class SourceConfig:
    """Neural-source-filter excitation of HiFT."""

    harmonics: int = 8                 # overtones above f0 (the source has harmonics + 1 sines)
    sine_amp: float = 0.1
    noise_std: float = 0.003           # additive noise where voiced; sine_amp / 3 where unvoiced
    voiced_threshold: float = 10.0     # Hz
    # "sample": phase is the per-sample running sum of f0 / rate (CosyVoice v1);
    # "frame": the sum runs over frames and is interpolated to samples (CosyVoice 2).
    phase: Literal["sample", "frame"] = "sample"
    f0_channels: int = 512
    f0_layers: int = 5
    resblock_kernels: list[int] = field(default_factory=lambda: [7, 11])
    resblock_dilations: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5]])


class F0Predictor(nn.Module):
    """Mel `(batch, n_mels, frames)` -> f0 in Hz `(batch, frames)`: k3 convs with ELU, a
    per-frame linear layer and the absolute value."""

    def __init__(self, n_mels: int, channels: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(n_mels if i == 0 else channels, channels, 3, padding=1)) for i in range(layers))
        self.proj = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = mel
        for conv in self.convs:
            x = F.elu(conv(masked(x, mask)))
        return self.proj(x.transpose(1, 2)).squeeze(-1).abs()


class SineSource(nn.Module):
    """f0 per frame -> excitation `(batch, 1, samples)` and voicing `(batch, samples, 1)`.

    The random parts (initial phases, additive noise) can be passed in as raw draws
    (`uniform` `(batch, harmonics + 1)` in [0, 1), `gaussian` `(batch, samples, harmonics + 1)`),
    which makes the source reproducible; `stochastic=False` uses zero phases and no noise.
    `offset` `(batch, harmonics + 1)` is the phase, in cycles, reached before the first
    frame, so that a stream can continue a previous chunk.
    """

    def __init__(self, cfg: SourceConfig, sample_rate: int, hop: int):
        super().__init__()
        self.cfg, self.sample_rate, self.hop = cfg, sample_rate, hop
        self.register_buffer("multiples", torch.arange(1, cfg.harmonics + 2, dtype=torch.float32), persistent=False)
        self.merge = nn.Linear(cfg.harmonics + 1, 1)

    def cycles_per_frame(self, f0: torch.Tensor) -> torch.Tensor:
        """Phase advance in cycles of each frame `(batch, frames, harmonics + 1)`, float64."""
        per_sample = f0[..., None] * self.multiples / self.sample_rate
        if self.cfg.phase == "frame":
            per_sample = per_sample % 1.0
        return per_sample.double() * self.hop

    def forward(self, f0: torch.Tensor, uniform: torch.Tensor | None = None,
                gaussian: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        excitation, uv = self.excitation(f0, uniform, gaussian, offset, stochastic)
        return torch.tanh(self.merge(excitation)).transpose(1, 2), uv

    def excitation(self, f0: torch.Tensor, uniform: torch.Tensor | None = None,
                   gaussian: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (harmonics with noise `(batch, samples, harmonics + 1)`, voicing `(batch, samples, 1)`)."""
        cfg = self.cfg
        batch = f0.shape[0]
        f0_samples = f0.repeat_interleave(self.hop, dim=1)[..., None]               # (B, L, 1)
        phase = self._phase(f0, f0_samples, offset)                                  # (B, L, H)
        if cfg.phase == "sample" and stochastic:
            # a random start phase per overtone (none for the fundamental) decorrelates them
            if uniform is None:
                uniform = torch.rand(batch, cfg.harmonics + 1, device=f0.device)
            start = (uniform * 2 - 1) * math.pi
            phase = phase + torch.cat([torch.zeros_like(start[:, :1]), start[:, 1:]], dim=1)[:, None, :]
        sine = cfg.sine_amp * torch.sin(phase)
        uv = (f0_samples > cfg.voiced_threshold).to(sine.dtype)
        if stochastic:
            if gaussian is None:
                gaussian = torch.randn_like(sine)
            noise_amp = uv * cfg.noise_std + (1 - uv) * (cfg.sine_amp / 3)
            excitation = sine * uv + noise_amp * gaussian
        else:
            excitation = sine * uv
        return excitation, uv

    def _phase(self, f0: torch.Tensor, f0_samples: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """Phase in radians `(batch, samples, harmonics + 1)`.

        The running sum is kept in float64: in float32 its rounding error reaches about 1e-3
        cycles after a few seconds of audio, and chunked synthesis would drift from offline.
        """
        if self.cfg.phase == "sample":
            cycles = torch.cumsum((f0_samples * self.multiples / self.sample_rate).double(), dim=1)
            if offset is not None:
                cycles = cycles + offset[:, None, :].double()
        else:
            # the phase at each frame centre, linearly interpolated to the samples in between
            at_frames = torch.cumsum(self.cycles_per_frame(f0), dim=1)
            if offset is not None:
                at_frames = at_frames + offset[:, None, :].double()
            cycles = _frames_to_samples(at_frames, self.hop)
        return (2 * math.pi) * (cycles % 1.0).float()


def _frames_to_samples(values: torch.Tensor, hop: int) -> torch.Tensor:
    """Linear interpolation `(batch, frames, c)` -> `(batch, frames * hop, c)` between frame
    centres (half-pixel convention; samples beyond the first/last centre take its value).
    Written out rather than `F.interpolate` because ONNX Runtime has no float64 Resize."""
    edges = torch.cat([values[:, :1], values, values[:, -1:]], dim=1)
    position = (torch.arange(hop, dtype=values.dtype, device=values.device) + 0.5) / hop
    first_half = (position < 0.5)[None, None, :, None]
    low = torch.where(first_half, edges[:, :-2, None], edges[:, 1:-1, None])
    high = torch.where(first_half, edges[:, 1:-1, None], edges[:, 2:, None])
    weight = torch.where(first_half, position[None, None, :, None] + 0.5, position[None, None, :, None] - 0.5)
    out = low + (high - low) * weight
    return out.reshape(values.shape[0], -1, values.shape[-1])


class STFT(nn.Module):
    """Centred STFT and its inverse with a periodic Hann window, written as fixed
    convolutions so that they export to ONNX and honour per-item lengths in a batch.

    Spectra are `(batch, 2 * bins, frames)`: the real parts of the `n_fft // 2 + 1` bins,
    then the imaginary parts.
    """

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * bins * torch.arange(n_fft, dtype=torch.float64)[None, :] / n_fft
        analysis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
        # inverse real DFT: bins other than DC and Nyquist stand for their mirror image too
        weight = torch.full_like(bins, 2.0)
        weight[0] = weight[-1] = 1.0
        synthesis = torch.cat([weight * torch.cos(angle), -weight * torch.sin(angle)]) * window / n_fft
        self.register_buffer("analysis", analysis[:, None, :].float(), persistent=False)
        self.register_buffer("synthesis", synthesis[:, None, :].float(), persistent=False)
        self.register_buffer("window_sq", window.square()[None, None, :].float(), persistent=False)

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        return samples // self.hop + 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, samples)` -> `(batch, 2 * bins, samples // hop + 1)`, zero beyond each item."""
        pad = self.n_fft // 2
        if lengths is None:
            padded = F.pad(x[:, None, :], (pad, pad), mode="reflect")
        else:
            padded = _pad_per_utterance(x, lengths, pad, pad, symmetric=False)[:, None, :]
        spec = F.conv1d(padded, self.analysis, stride=self.hop)
        return spec if lengths is None else masked(spec, time_mask(self.frames(lengths), spec.shape[-1]))

    def inverse(self, spec: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, 2 * bins, n)` -> `(batch, (n - 1) * hop)`; `frames` `(batch,)` valid counts."""
        ones = torch.ones_like(spec[:, :1, :])
        mask = ones if frames is None else time_mask(frames, spec.shape[-1]).to(spec.dtype)
        summed = F.conv_transpose1d(spec * mask, self.synthesis, stride=self.hop)
        envelope = F.conv_transpose1d(mask, self.window_sq, stride=self.hop)
        pad = self.n_fft // 2
        wave = summed / envelope.clamp_min(1e-11)
        return wave[:, 0, pad:wave.shape[-1] - pad]


def time_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """`(batch, 1, total)` float mask of the valid steps, to multiply channel-first tensors."""
    return lengths_to_mask(lengths, total).float()[:, None, :]
