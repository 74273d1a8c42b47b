"""HiFi-GAN generators: the classic waveform generator (V1, a small V3-like one) and HiFT.

Both are one `Generator`: a mel `(batch, n_mels, frames)` goes through a k7 conv, then
stages of [LeakyReLU, upsampling (a transposed conv by default), parallel residual
blocks averaged], then a k7 conv.
Classic HiFi-GAN ends in tanh; HiFT (CosyVoice's vocoder) uses Snake activations, adds a
neural-source-filter excitation at every stage, and outputs a log-magnitude / phase
spectrum that an inverse STFT turns into samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cosy.audio import MelConfig
from cosy.errors import CosyError
from cosy.vocoder.hift import STFT, F0Predictor, SineSource, SourceConfig, time_mask, masked, weight_norm


@dataclass
class GeneratorConfig:
    """Defaults are HiFi-GAN V1 at 22050 Hz / hop 256."""

    base_channels: int = 512
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8, 2, 2])
    upsample_kernels: list[int] = field(default_factory=lambda: [16, 16, 4, 4])
    resblock_kernels: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilations: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    activation: Literal["leaky_relu", "snake"] = "leaky_relu"
    # "transposed": transposed convs, as in HiFi-GAN and HiFT (and their released weights).
    # "nearest": repeat each step `rate` times, then a conv one tap longer than the kernel
    # (Odena et al. 2016). A transposed conv's taps differ by output phase, so the first
    # stage paints a pattern that repeats every mel frame: a buzz at frame rate (86 Hz at
    # 22050 / 256) that discriminators train away but a short mel-loss-only training does
    # not, and that overrides every voice's pitch (recipes/mini/RESULTS.md).
    upsample: Literal["transposed", "nearest"] = "transposed"
    # istft_n_fft > 0 makes the last conv output an STFT of that size (HiFT); 0 a waveform
    istft_n_fft: int = 0
    istft_hop: int = 4
    source: SourceConfig | None = None   # the NSF excitation (needs the STFT output)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned alpha per channel: periodic inductive bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        # multiply by the per-channel reciprocal rather than divide the whole tensor
        return torch.addcmul(x, torch.sin(alpha * x).square(), 1.0 / (alpha + 1e-9))


class LeakyReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.1)


def _activation(kind: str, channels: int) -> nn.Module:
    return Snake(channels) if kind == "snake" else LeakyReLU()


class ResUnit(nn.Module):
    """x + conv(act(conv_dilated(act(x)))), 'same' padding."""

    def __init__(self, channels: int, kernel: int, dilation: int, activation: str):
        super().__init__()
        self.act1 = _activation(activation, channels)
        self.conv1 = weight_norm(nn.Conv1d(channels, channels, kernel, dilation=dilation,
                                           padding=(kernel - 1) * dilation // 2))
        self.act2 = _activation(activation, channels)
        self.conv2 = weight_norm(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(masked(self.act1(x), mask))
        return x + self.conv2(masked(self.act2(y), mask))

    def reach(self) -> int:
        """Samples of context this unit reads on each side."""
        return (self.conv1.kernel_size[0] - 1) * self.conv1.dilation[0] // 2 + (self.conv2.kernel_size[0] - 1) // 2


class ResBlock(nn.Module):
    """`(batch, channels, time)` -> same; one ResUnit per dilation, in sequence."""

    def __init__(self, channels: int, kernel: int, dilations: list[int], activation: str):
        super().__init__()
        self.units = nn.ModuleList(ResUnit(channels, kernel, d, activation) for d in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for unit in self.units:
            x = unit(x, mask)
        return x

    def reach(self) -> int:
        return sum(unit.reach() for unit in self.units)


class NearestUpsample(nn.Module):
    """`(batch, c_in, t)` -> `(batch, c_out, t * rate)`: nearest-neighbour repeat, then a
    'same' conv of `kernel + 1` taps (odd, so it is centred)."""

    def __init__(self, c_in: int, c_out: int, rate: int, kernel: int):
        super().__init__()
        self.rate = rate
        self.conv = weight_norm(nn.Conv1d(c_in, c_out, kernel + 1, padding=kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.rate, mode="nearest"))

    def reach(self) -> float:
        """Input steps on each side that can influence an output sample."""
        return 1 + (self.conv.kernel_size[0] // 2) / self.rate


def _upsampler(c_in: int, c_out: int, rate: int, kernel: int, kind: str) -> nn.Module:
    if kind == "nearest":
        return NearestUpsample(c_in, c_out, rate, kernel)
    return weight_norm(nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2))


def _upsampler_reach(upsample: nn.Module) -> float:
    """Input steps on each side that can influence an output sample of either upsampler."""
    if isinstance(upsample, NearestUpsample):
        return upsample.reach()
    return upsample.kernel_size[0] / (2 * upsample.stride[0])


class UpsampleStage(nn.Module):
    """LeakyReLU, upsampling by `rate`, plus the source branch (HiFT), then the mean of
    the parallel ResBlocks. `(batch, c_in, t)` -> `(batch, c_out, t * rate [+ 1 if pad_left])`."""

    def __init__(self, c_in: int, c_out: int, rate: int, kernel: int, cfg: GeneratorConfig,
                 source_stride: int | None, source_kernel: int, source_dilations: list[int], pad_left: bool):
        super().__init__()
        self.pad_left = pad_left
        self.rate = rate
        self.upsample = _upsampler(c_in, c_out, rate, kernel, cfg.upsample)
        self.source_down = self.source_block = None
        if source_stride is not None:
            # the source spectrum runs at the final STFT rate: stride down to this stage's rate
            spec_channels = cfg.istft_n_fft + 2
            if source_stride == 1:
                self.source_down = nn.Conv1d(spec_channels, c_out, 1)
            else:
                self.source_down = nn.Conv1d(spec_channels, c_out, 2 * source_stride, source_stride,
                                             padding=source_stride // 2)
            self.source_block = ResBlock(c_out, source_kernel, source_dilations, cfg.activation)
        self.blocks = nn.ModuleList(ResBlock(c_out, k, d, cfg.activation)
                                    for k, d in zip(cfg.resblock_kernels, cfg.resblock_dilations))

    def forward(self, x: torch.Tensor, source_spec: torch.Tensor | None, mask_in: torch.Tensor | None,
                mask_out: torch.Tensor | None) -> torch.Tensor:
        x = self.upsample(masked(F.leaky_relu(x, 0.1), mask_in))
        if self.pad_left:
            # the STFT has one frame more than hops: repeat-by-reflection supplies it
            x = F.pad(x, (1, 0), mode="reflect")
        if self.source_down is not None:
            x = x + self.source_block(self.source_down(source_spec), mask_out)
        return sum(block(x, mask_out) for block in self.blocks) / len(self.blocks)


class Generator(nn.Module):
    """Mel `(batch, n_mels, frames)` -> waveform `(batch, frames * hop)`."""

    def __init__(self, cfg: GeneratorConfig, mel: MelConfig):
        super().__init__()
        _check(cfg, mel)
        self.cfg, self.mel = cfg, mel
        self.hop = mel.hop_length
        rates = cfg.upsample_rates
        channels = [cfg.base_channels // 2 ** i for i in range(len(rates) + 1)]
        self.conv_pre = weight_norm(nn.Conv1d(mel.n_mels, channels[0], 7, padding=3))
        istft = cfg.istft_n_fft > 0
        src = cfg.source
        self.stages = nn.ModuleList(
            UpsampleStage(channels[i], channels[i + 1], rate, kernel, cfg,
                          source_stride=math.prod(rates[i + 1:]) if src is not None else None,
                          source_kernel=src.resblock_kernels[i] if src is not None else 0,
                          source_dilations=src.resblock_dilations[i] if src is not None else [],
                          pad_left=istft and i == len(rates) - 1)
            for i, (rate, kernel) in enumerate(zip(rates, cfg.upsample_kernels)))
        out_channels = cfg.istft_n_fft + 2 if istft else 1
        self.conv_post = weight_norm(nn.Conv1d(channels[-1], out_channels, 7, padding=3))
        self.stft = STFT(cfg.istft_n_fft, cfg.istft_hop) if istft else None
        self.f0_predictor = self.source = None
        if src is not None:
            self.f0_predictor = F0Predictor(mel.n_mels, src.f0_channels, src.f0_layers)
            self.source = SineSource(src, mel.sample_rate, self.hop)

    # ---- the three steps of synthesis --------------------------------------------------

    def predict_f0(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, n_mels, frames)` -> f0 in Hz `(batch, frames)` (HiFT only), 0 beyond `lengths`
        (a zero f0 adds no phase, so a padded item's phase ends as it would alone)."""
        if lengths is None:
            return self.f0_predictor(mel)
        mask = time_mask(lengths, mel.shape[-1])
        return self.f0_predictor(mel, mask) * mask[:, 0]

    def make_source(self, f0: torch.Tensor, lengths: torch.Tensor | None = None, **draws) -> torch.Tensor:
        """f0 `(batch, frames)` -> excitation `(batch, 1, frames * hop)`, zero beyond each item.
        `draws` go to `SineSource.forward` (uniform, gaussian, offset, stochastic)."""
        source, _ = self.source(f0, **draws)
        return source if lengths is None else masked(source, time_mask(lengths * self.hop, source.shape[-1]))

    def decode(self, mel: torch.Tensor, source: torch.Tensor | None = None,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mel `(batch, n_mels, frames)` [+ source `(batch, 1, frames * hop)`] -> `(batch, frames * hop)`,
        zero beyond each item's `lengths * hop` samples."""
        spec = None
        if self.source is not None:
            spec = self.stft(source[:, 0], None if lengths is None else lengths * self.hop)
        masks = self._masks(lengths, mel.shape[-1])
        x = self.conv_pre(masked(mel, masks[0]))
        for i, stage in enumerate(self.stages):
            x = stage(x, spec, masks[i], masks[i + 1])
        x = self.conv_post(masked(F.leaky_relu(x), masks[-1]))
        if self.stft is None:
            wave = torch.tanh(x[:, 0])
        else:
            bins = self.cfg.istft_n_fft // 2 + 1
            magnitude = torch.exp(x[:, :bins]).clamp(max=100.0)
            phase = torch.sin(x[:, bins:])   # sin keeps the raw output in a bounded range
            spectrum = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
            frames = None if lengths is None else self.stft.frames(lengths * self.hop)
            wave = self.stft.inverse(spectrum, frames).clamp(-0.99, 0.99)
        return wave if lengths is None else masked(wave, time_mask(lengths * self.hop, wave.shape[-1])[:, 0])

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None,
                stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (waveform `(batch, frames * hop)`, predicted f0 `(batch, frames)` or None)."""
        if self.source is None:
            return self.decode(mel, None, lengths), None
        f0 = self.predict_f0(mel, lengths)
        source = self.make_source(f0, lengths, stochastic=stochastic)
        return self.decode(mel, source, lengths), f0

    def _masks(self, lengths: torch.Tensor | None, frames: int) -> list[torch.Tensor | None]:
        """Masks at the input and after each stage (None without lengths)."""
        if lengths is None:
            return [None] * (len(self.stages) + 1)
        masks, scale = [time_mask(lengths, frames)], 1
        for stage in self.stages:
            scale *= stage.rate
            extra = 1 if stage.pad_left else 0
            masks.append(time_mask(lengths * scale + extra, frames * scale + extra))
        return masks

    def receptive_frames(self) -> int:
        """Mel frames on each side that can influence a sample (an upper bound, rounded up)."""
        reach, scale = 3.0, 1          # conv_pre
        for stage in self.stages:
            reach += _upsampler_reach(stage.upsample) / scale
            scale *= stage.rate
            block_reach = max(block.reach() for block in stage.blocks)
            if stage.source_block is not None:
                block_reach += stage.source_block.reach() + stage.source_down.kernel_size[0]
            reach += block_reach / scale
        reach += 3 / scale
        if self.stft is not None:
            reach += self.cfg.istft_n_fft / self.hop * 2
        if self.f0_predictor is not None:
            reach += len(self.f0_predictor.convs) + 1
        return int(reach) + 1

    def remove_weight_norm(self) -> "Generator":
        """Fold every weight-norm parametrisation into a plain weight (for inference/export)."""
        for module in self.modules():
            if nn.utils.parametrize.is_parametrized(module, "weight"):
                nn.utils.parametrize.remove_parametrizations(module, "weight")
        return self


def _check(cfg: GeneratorConfig, mel: MelConfig) -> None:
    where = "model.generator"
    if len(cfg.upsample_rates) != len(cfg.upsample_kernels):
        raise CosyError(f"{where}.upsample_kernels must have one kernel per upsample rate")
    if any((k - r) % 2 or k < r for r, k in zip(cfg.upsample_rates, cfg.upsample_kernels)):
        raise CosyError(f"{where}.upsample_kernels: each kernel must be >= its rate and differ from it by an "
                        "even number (so that a stage gives exactly rate x frames)")
    if len(cfg.resblock_kernels) != len(cfg.resblock_dilations):
        raise CosyError(f"{where}.resblock_dilations must have one list per resblock kernel")
    total = math.prod(cfg.upsample_rates) * (cfg.istft_hop if cfg.istft_n_fft > 0 else 1)
    if total != mel.hop_length:
        raise CosyError(f"{where}.upsample_rates multiply to {total} samples per frame"
                        f"{' (with istft_hop)' if cfg.istft_n_fft else ''} but model.mel.hop_length is {mel.hop_length}")
    if cfg.base_channels % 2 ** len(cfg.upsample_rates):
        raise CosyError(f"{where}.base_channels must be divisible by 2 ** (number of upsample stages)")
    if mel.center:
        raise CosyError("model.mel.center must be false: the vocoder maps each frame to exactly hop samples")
    if cfg.source is not None:
        if cfg.istft_n_fft <= 0:
            raise CosyError(f"{where}.source needs {where}.istft_n_fft > 0 (the source enters as an STFT)")
        if not len(cfg.source.resblock_kernels) == len(cfg.source.resblock_dilations) == len(cfg.upsample_rates):
            raise CosyError(f"{where}.source.resblock_kernels and resblock_dilations need one entry per upsample stage")
