"""CAM++ speaker embedding network (Wang et al., 2023, arXiv 2303.00332).

A 2-D convolutional front module turns the fbank "image" into channels, densely
connected TDNN blocks with context-aware masking model it over time, and statistics
pooling plus one dense layer give a fixed-size embedding. `SpeakerModel` adds the
additive angular margin classifier used to train it on speaker labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cosy.errors import CosyError
from cosy.speaker.ecapa import ECAPAConfig, ECAPATDNN
from cosy.speaker.loss import AAMConfig, AAMSoftmax


@dataclass
class CAMPPlusConfig:
    """Sizes of the network; the defaults are the published CAM++ sizes (about 6.8 M parameters)."""

    feat_dim: int = 80
    embedding_dim: int = 192
    fcm_channels: int = 32
    fcm_blocks: tuple[int, ...] = (2, 2)
    init_channels: int = 128
    growth_rate: int = 32
    bottleneck_scale: int = 4
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    cam_reduction: int = 2
    segment_frames: int = 100


@dataclass
class SpeakerConfig:
    """The `model:` section of a `task: speaker` experiment.

    speakers: file whose first column lists the training speaker ids (a `spk2utt` or a
        plain list); line order gives the class index.
    segment_seconds: length of the random crop each training utterance contributes.
    architecture: which embedding network; its sizes are the section of the same name.
    """

    speakers: str = ""
    segment_seconds: float = 3.0
    architecture: Literal["campplus", "ecapa_tdnn"] = "campplus"
    campplus: CAMPPlusConfig = field(default_factory=CAMPPlusConfig)
    ecapa_tdnn: ECAPAConfig = field(default_factory=ECAPAConfig)
    loss: AAMConfig = field(default_factory=AAMConfig)

    @property
    def encoder(self) -> CAMPPlusConfig | ECAPAConfig:
        return getattr(self, self.architecture)


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(channels), nn.ReLU())


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with a shortcut; `stride` shrinks the frequency axis only."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, freq, frames) -> (batch, channels, freq / stride, frames)."""
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class FrontConvModule(nn.Module):
    """2-D residual front end; halves the frequency axis three times, keeps frames."""

    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        c = cfg.fcm_channels
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for count in cfg.fcm_blocks:
            blocks += [ResBlock2d(c, c, stride=2)] + [ResBlock2d(c, c, stride=1) for _ in range(count - 1)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=(2, 1), padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        )
        freq = cfg.feat_dim
        for _ in range(len(cfg.fcm_blocks) + 1):
            freq = (freq + 1) // 2
        self.out_channels = c * freq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, feat_dim, frames) -> (batch, out_channels, frames)."""
        y = self.out(self.blocks(self.stem(x.unsqueeze(1))))
        return y.flatten(1, 2)


class ContextAwareMask(nn.Module):
    """A TDNN layer whose output is gated by utterance- and segment-level context.

    The gate sees the mean over the whole utterance plus the mean over the segment of
    `segment_frames` frames that each frame belongs to, so a frame is weighted by what
    surrounds it at two scales.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilation: int,
                 reduction: int, segment_frames: int):
        super().__init__()
        self.local = nn.Conv1d(in_channels, out_channels, kernel, padding=(kernel - 1) // 2 * dilation,
                               dilation=dilation, bias=False)
        self.gate = nn.Sequential(
            nn.Conv1d(in_channels, in_channels // reduction, 1),
            nn.ReLU(),
            nn.Conv1d(in_channels // reduction, out_channels, 1),
            nn.Sigmoid(),
        )
        self.segment_frames = segment_frames

    def segment_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, frames) -> per-frame mean of its segment, same shape."""
        seg = F.avg_pool1d(x, self.segment_frames, self.segment_frames, ceil_mode=True)
        seg = seg.unsqueeze(-1).expand(-1, -1, -1, self.segment_frames).flatten(2)
        return seg[..., : x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, frames) -> (batch, out_channels, frames)."""
        context = x.mean(-1, keepdim=True) + self.segment_mean(x)
        return self.local(x) * self.gate(context)


class DenseTDNNLayer(nn.Module):
    """Bottleneck 1x1 conv then a context-aware TDNN; returns only the new channels."""

    def __init__(self, in_channels: int, cfg: CAMPPlusConfig, kernel: int, dilation: int):
        super().__init__()
        hidden = cfg.bottleneck_scale * cfg.growth_rate
        self.bottleneck = nn.Sequential(_bn_relu(in_channels), nn.Conv1d(in_channels, hidden, 1, bias=False),
                                        _bn_relu(hidden))
        self.cam = ContextAwareMask(hidden, cfg.growth_rate, kernel, dilation, cfg.cam_reduction,
                                    cfg.segment_frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, frames) -> (batch, growth_rate, frames)."""
        return self.cam(self.bottleneck(x))


class DenseTDNNBlock(nn.Module):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs."""

    def __init__(self, in_channels: int, layers: int, cfg: CAMPPlusConfig, kernel: int, dilation: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseTDNNLayer(in_channels + i * cfg.growth_rate, cfg, kernel, dilation) for i in range(layers)
        )
        self.out_channels = in_channels + layers * cfg.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, frames) -> (batch, out_channels, frames)."""
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class CAMPPlus(nn.Module):
    """Mean-normalised fbank -> speaker embedding (the released ONNX contract's function)."""

    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        lengths = {len(cfg.block_layers), len(cfg.block_kernels), len(cfg.block_dilations)}
        if len(lengths) != 1:
            raise CosyError("config keys 'model.campplus.block_layers', 'block_kernels' and 'block_dilations' "
                            f"must have the same length, got {len(cfg.block_layers)}, {len(cfg.block_kernels)} "
                            f"and {len(cfg.block_dilations)}")
        self.cfg = cfg
        self.fcm = FrontConvModule(cfg)
        channels = cfg.init_channels
        # The first TDNN halves the frame rate; all later layers keep it.
        stages: list[nn.Module] = [
            nn.Conv1d(self.fcm.out_channels, channels, 5, stride=2, padding=2, bias=False), _bn_relu(channels)
        ]
        for layers, kernel, dilation in zip(cfg.block_layers, cfg.block_kernels, cfg.block_dilations):
            block = DenseTDNNBlock(channels, layers, cfg, kernel, dilation)
            channels = block.out_channels // 2
            stages += [block, _bn_relu(block.out_channels), nn.Conv1d(block.out_channels, channels, 1, bias=False)]
        stages.append(_bn_relu(channels))
        self.tdnn = nn.Sequential(*stages)
        self.embed = nn.Linear(2 * channels, cfg.embedding_dim, bias=False)
        # No affine: the embedding stays centred and unit-variance per dimension.
        self.embed_norm = nn.BatchNorm1d(cfg.embedding_dim, affine=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (batch, frames, feat_dim), fbank minus its mean over frames -> (batch, embedding_dim)."""
        h = self.tdnn(self.fcm(feats.transpose(1, 2)))
        stats = torch.cat([h.mean(-1), h.std(-1)], dim=-1)
        return self.embed_norm(self.embed(stats))


SpeakerEncoder = CAMPPlus | ECAPATDNN


def build_encoder(cfg: SpeakerConfig) -> SpeakerEncoder:
    """The embedding network named by `cfg.architecture`."""
    return CAMPPlus(cfg.campplus) if cfg.architecture == "campplus" else ECAPATDNN(cfg.ecapa_tdnn)


class SpeakerModel(nn.Module):
    """An embedding network trained as a speaker classifier with additive angular margin softmax."""

    def __init__(self, cfg: SpeakerConfig, num_speakers: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.loss = AAMSoftmax(cfg.loss, cfg.encoder.embedding_dim, num_speakers)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: feats (batch, frames, feat_dim), labels (batch,) -> {"loss", "acc"}."""
        return self.loss(self.encoder(batch["feats"]), batch["labels"])
