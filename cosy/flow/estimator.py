"""The vector-field estimator of the flow decoder: a 1-D U-Net with transformer blocks.

It predicts the flow velocity from the noisy mel `x`, the conditioning `mu`, the speaker
vector and the prompt mel `cond` (Matcha-TTS style). With `causal: true` every
convolution looks only left, normalisation is per frame and attention is chunk-causal;
such an estimator can then be run chunk by chunk with a `cache` dict (one per solver
step) and gives the same numbers as one run over the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cosy.modules.attention import MultiHeadAttention
from cosy.modules.masks import padding_and_chunk_mask

Cache = dict  # module -> its streaming state; one dict per solver step


@dataclass
class EstimatorConfig:
    channels: list[int] = field(default_factory=lambda: [256, 256])
    n_blocks: int = 4  # transformer blocks per U-Net level
    n_mid_blocks: int = 12
    heads: int = 8
    head_dim: int = 64
    groups: int = 8  # GroupNorm groups of the non-causal conv blocks


class Conv(nn.Conv1d):
    """Conv1d with 'same' padding, or causal (left context only) when `causal`.

    A causal conv given a `cache` reads its left context from it and leaves the last
    input frames there, so consecutive chunks give the one-pass result. With stride 2
    the chunks must have even lengths.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, causal: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=0 if causal else kernel // 2)
        self.causal = causal

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(batch, cin, frames) -> (batch, cout, frames / stride)."""
        if not self.causal:
            return super().forward(x)
        left = self.kernel_size[0] - 1
        past = cache.get(self) if cache is not None else None
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], left)
        x = torch.cat([past, x], dim=2)
        if cache is not None:
            cache[self] = x[:, :, x.shape[2] - left:]
        return super().forward(x)


class RepeatConv(Conv):
    """Causal 2x upsampling: repeat every frame, then a causal conv."""

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return super().forward(x.repeat_interleave(2, dim=2), cache)


class TransposedConv(nn.ConvTranspose1d):
    """Non-causal 2x upsampling (kernel 4, stride 2); takes `cache` only for a uniform call."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return super().forward(x)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each frame of a (batch, channels, frames) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvBlock(nn.Module):
    """Conv k3 -> norm -> Mish. GroupNorm pools statistics over time, so the causal
    variant normalises each frame over its channels instead."""

    def __init__(self, cin: int, cout: int, groups: int, causal: bool):
        super().__init__()
        self.conv = Conv(cin, cout, 3, causal=causal)
        self.norm = ChannelNorm(cout) if causal else nn.GroupNorm(groups, cout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        """(batch, cin, frames), mask (batch, 1, frames) -> (batch, cout, frames)."""
        if mask is not None:
            x = x * mask
        y = F.mish(self.norm(self.conv(x, cache)))
        return y if mask is None else y * mask


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, causal: bool):
        super().__init__()
        self.block1 = ConvBlock(cin, cout, groups, causal)
        self.time = nn.Linear(time_dim, cout)
        self.block2 = ConvBlock(cout, cout, groups, causal)
        self.res = nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """x (batch, cin, frames), temb (batch, time_dim) -> (batch, cout, frames)."""
        h = self.block1(x, mask, cache) + self.time(F.mish(temb)).unsqueeze(-1)
        return self.block2(h, mask, cache) + self.res(x * mask)


class RecentKV:
    """Streaming keys/values of one attention layer, keeping only the last `window`
    frames (all when negative): the left context the chunk mask allows.

    Same `write` contract as cosy.modules.attention.KVCache, which instead preallocates
    the whole sequence; here memory stays bounded however long the stream runs.
    """

    def __init__(self, window: int):
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v (batch, heads, n, head_dim) of the new chunk -> keys/values it may see."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        start = 0 if self.window < 0 else max(0, k.shape[2] - self.window)
        self.k, self.v = k[:, :, start:], v[:, :, start:]
        return k, v


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward (diffusers' BasicTransformerBlock).

    `window`: frames of left context kept when streaming (see RecentKV).
    """

    def __init__(self, width: int, heads: int, head_dim: int, window: int = -1):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = MultiHeadAttention(width, heads, head_dim=head_dim, qkv_bias=False)
        self.norm2 = nn.LayerNorm(width, eps=1e-5)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.window = window

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None = None) -> torch.Tensor:
        """x (batch, frames, width); mask (batch, frames, keys) bool, None when streaming."""
        h = self.norm1(x)
        if cache is None:
            h = self.attn(h, mask)
        else:
            kv = cache.setdefault(self, RecentKV(self.window))
            # plain (position-free) attention: positions only satisfy the cache contract
            h = self.attn(h, None, positions=torch.zeros(1, x.shape[1], dtype=torch.long, device=x.device),
                          cache=kv)
        x = x + h
        return x + self.ff(self.norm2(x))


class Level(nn.Module):
    """One U-Net stage: ResNet block, transformer blocks, then a resampling conv."""

    def __init__(self, cin: int, cout: int, time_dim: int, cfg: EstimatorConfig, causal: bool,
                 resample: nn.Module | None, window: int = -1):
        super().__init__()
        self.resnet = ResnetBlock(cin, cout, time_dim, cfg.groups, causal)
        self.transformers = nn.ModuleList(
            TransformerBlock(cout, cfg.heads, cfg.head_dim, window) for _ in range(cfg.n_blocks))
        self.resample = resample

    def features(self, x: torch.Tensor, mask: torch.Tensor, attn_mask: torch.Tensor | None,
                 temb: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """(batch, cin, frames) -> (batch, cout, frames), before resampling."""
        x = self.resnet(x, mask, temb, cache).transpose(1, 2)
        for block in self.transformers:
            x = block(x, attn_mask, cache)
        return x.transpose(1, 2)


def time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow times t (batch,) -> (batch, dim): [sin..., cos...]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * (-math.log(10000) / (half - 1)))
    arg = scale * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class Estimator(nn.Module):
    """v(x, mu, spk, cond, t): the U-Net on the channel concatenation [x, mu, spk, cond].

    Causal estimators attend chunk-causally: `chunk` frames per chunk (a multiple of
    2**(levels - 1), so that chunk borders survive the downsampling), each chunk seeing
    itself and `left_chunks` earlier chunks (all when negative).
    """

    def __init__(self, cfg: EstimatorConfig, n_mels: int, causal: bool = False, chunk: int = 0,
                 left_chunks: int = -1):
        super().__init__()
        self.causal, self.chunk, self.left_chunks = causal, chunk, left_chunks
        self.in_channels = 4 * n_mels
        ch = list(cfg.channels)
        time_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(self.in_channels, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        last = len(ch) - 1

        def window(level: int) -> int:
            return -1 if left_chunks < 0 else left_chunks * (chunk >> level)

        self.down = nn.ModuleList()
        cin = self.in_channels
        for i, c in enumerate(ch):
            resample = Conv(c, c, 3, stride=1 if i == last else 2, causal=causal)
            self.down.append(Level(cin, c, time_dim, cfg, causal, resample, window(i)))
            cin = c
        self.mid = nn.ModuleList(Level(ch[-1], ch[-1], time_dim, cfg, causal, None, window(last))
                                 for _ in range(cfg.n_mid_blocks))
        self.up = nn.ModuleList()
        up_ch = ch[::-1] + [ch[0]]
        for i in range(len(ch)):
            c = up_ch[i + 1]
            if i == last:
                resample = Conv(c, c, 3, causal=causal)
            elif causal:
                resample = RepeatConv(c, c, 3, causal=True)
            else:
                resample = TransposedConv(c)
            self.up.append(Level(2 * up_ch[i], c, time_dim, cfg, causal, resample, window(last - i)))
        self.final_block = ConvBlock(ch[0], ch[0], cfg.groups, causal)
        self.final_proj = nn.Conv1d(ch[0], n_mels, 1)

    def _attn_mask(self, mask: torch.Tensor, level: int, streaming: bool) -> torch.Tensor | None:
        if streaming:  # whole chunks arrive; RecentKV holds exactly the visible keys
            return None
        lengths = mask.sum(dim=(1, 2)).long()
        chunk = self.chunk >> level if self.causal else 0
        return padding_and_chunk_mask(lengths, mask.shape[2], chunk, self.left_chunks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """x, mu, cond (batch, n_mels, frames); mask (batch, 1, frames); t (batch,);
        spks (batch, n_mels) -> velocity (batch, n_mels, frames).

        With `cache` (causal estimators only) `x` is the next chunk of a sequence whose
        earlier chunks went through with the same dict.
        """
        streaming = cache is not None
        temb = self.time_mlp(time_embedding(t, self.in_channels))
        spk = spks.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([x, mu, spk, cond], dim=1)
        skips, masks = [], [mask]
        for level, stage in enumerate(self.down):
            m = masks[-1]
            x = stage.features(x, m, self._attn_mask(m, level, streaming), temb, cache)
            skips.append(x)
            x = stage.resample(x * m, cache)
            masks.append(m[:, :, ::2])
        masks.pop()
        m = masks[-1]
        mid_mask = self._attn_mask(m, len(self.down) - 1, streaming)
        for stage in self.mid:
            x = stage.features(x, m, mid_mask, temb, cache)
        for i, stage in enumerate(self.up):
            m = masks.pop()
            skip = skips.pop()
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
            x = stage.features(x, m, self._attn_mask(m, len(self.up) - 1 - i, streaming), temb, cache)
            x = stage.resample(x * m, cache)
        x = self.final_block(x, m, cache)
        return self.final_proj(x * m) * mask
