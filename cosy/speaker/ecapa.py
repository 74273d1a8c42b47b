"""ECAPA-TDNN speaker embedding network (Desplanques et al., 2020, arXiv 2005.07143).

SE-Res2Net TDNN blocks with growing dilation, aggregation of all block outputs, and
attentive statistics pooling that sees global context. The input contract is that of
CAM++: mean-normalised fbank (batch, frames, feat_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cosy.errors import CosyError


@dataclass
class ECAPAConfig:
    """Sizes of the network; the defaults are the paper's C = 1024 model (about 15 M parameters)."""

    feat_dim: int = 80
    embedding_dim: int = 192
    channels: int = 1024
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (2, 3, 4)
    res2_scale: int = 8
    se_channels: int = 128
    aggregate_channels: int = 1536
    attention_channels: int = 128


class TDNN(nn.Sequential):
    """Dilated conv -> ReLU -> batch norm, (batch, in, frames) -> (batch, out, frames)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1):
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel, padding=(kernel - 1) // 2 * dilation, dilation=dilation),
            nn.ReLU(),
            nn.BatchNorm1d(out_channels),
        )


class Res2Conv(nn.Module):
    """Channel groups convolved in a chain, each also fed the previous group's output.

    Later groups thus see several receptive fields at the price of one conv per group.
    """

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        if channels % scale:
            raise CosyError(f"ecapa_tdnn: channels {channels} must be divisible by res2_scale {scale}")
        self.scale = scale
        width = channels // scale
        self.convs = nn.ModuleList(TDNN(width, width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, frames) -> same shape; the first group passes through."""
        groups = x.chunk(self.scale, dim=1)
        outputs = [groups[0]]
        y = None
        for conv, group in zip(self.convs, groups[1:]):
            y = conv(group if y is None else group + y)
            outputs.append(y)
        return torch.cat(outputs, dim=1)


class SqueezeExcite(nn.Module):
    """Rescales each channel by a gate computed from the utterance mean."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, channels, 1),
                                  nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, frames) -> same shape."""
        return x * self.gate(x.mean(-1, keepdim=True))


class SERes2Block(nn.Module):
    def __init__(self, cfg: ECAPAConfig, kernel: int, dilation: int):
        super().__init__()
        c = cfg.channels
        self.body = nn.Sequential(TDNN(c, c), Res2Conv(c, cfg.res2_scale, kernel, dilation), TDNN(c, c),
                                  SqueezeExcite(c, cfg.se_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, frames) -> same shape."""
        return x + self.body(x)


class AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and standard deviation over frames, per channel.

    The attention sees each frame next to the utterance's plain mean and deviation, so
    it can weigh a frame by how typical it is of the whole recording.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.attention = nn.Sequential(TDNN(3 * channels, hidden), nn.Tanh(), nn.Conv1d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, frames) -> (batch, 2 * channels)."""
        frames = x.shape[-1]
        context = torch.cat([x, x.mean(-1, keepdim=True).expand(-1, -1, frames),
                             x.std(-1, keepdim=True).expand(-1, -1, frames)], dim=1)
        weights = self.attention(context).softmax(dim=-1)
        mean = (weights * x).sum(-1)
        std = ((weights * x.square()).sum(-1) - mean.square()).clamp_min(1e-6).sqrt()
        return torch.cat([mean, std], dim=-1)


class ECAPATDNN(nn.Module):
    """Mean-normalised fbank -> speaker embedding, the same contract as CAMPPlus."""

    def __init__(self, cfg: ECAPAConfig):
        super().__init__()
        if len(cfg.block_kernels) != len(cfg.block_dilations):
            raise CosyError("config keys 'model.ecapa_tdnn.block_kernels' and 'block_dilations' must have the same "
                            f"length, got {len(cfg.block_kernels)} and {len(cfg.block_dilations)}")
        self.cfg = cfg
        self.stem = TDNN(cfg.feat_dim, cfg.channels, kernel=5)
        self.blocks = nn.ModuleList(SERes2Block(cfg, k, d) for k, d in zip(cfg.block_kernels, cfg.block_dilations))
        # Multi-layer feature aggregation: the pooled frames see every block, not just the last.
        self.aggregate = TDNN(len(cfg.block_kernels) * cfg.channels, cfg.aggregate_channels)
        self.pool = AttentiveStatsPool(cfg.aggregate_channels, cfg.attention_channels)
        self.pool_norm = nn.BatchNorm1d(2 * cfg.aggregate_channels)
        self.embed = nn.Linear(2 * cfg.aggregate_channels, cfg.embedding_dim)
        self.embed_norm = nn.BatchNorm1d(cfg.embedding_dim, affine=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (batch, frames, feat_dim), fbank minus its mean over frames -> (batch, embedding_dim)."""
        h = self.stem(feats.transpose(1, 2))
        outputs = []
        for block in self.blocks:
            h = block(h)
            outputs.append(h)
        pooled = self.pool_norm(self.pool(self.aggregate(torch.cat(outputs, dim=1))))
        return self.embed_norm(self.embed(pooled))
