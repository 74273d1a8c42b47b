"""Length regulator: token-rate features -> mel-rate features.

Non-causal (v1): linear interpolation to the mel length, then a conv stack. Causal
(streaming): each token becomes `ratio` frames by repetition, then causal convs, so a
chunk of tokens maps to a fixed chunk of frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosy.flow.estimator import Cache, ConvBlock
from cosy.modules.masks import lengths_to_mask


def interpolate(h: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, channels, n) -> (batch, channels, frames), linear, half-pixel centres."""
    return F.interpolate(h, size=frames, mode="linear", align_corners=False)


class LengthRegulator(nn.Module):
    def __init__(self, channels: int, n_convs: int, causal: bool = False, ratio: int = 1):
        super().__init__()
        self.causal, self.ratio = causal, ratio
        # GroupNorm with one group normalises over channels and time together
        self.blocks = nn.ModuleList(ConvBlock(channels, channels, 1, causal) for _ in range(n_convs))
        self.proj = nn.Conv1d(channels, channels, 1)

    def convs(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(batch, channels, frames) -> (batch, channels, frames)."""
        for block in self.blocks:
            x = block(x, cache=cache)
        return self.proj(x)

    def forward(self, h: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Training path: h (batch, tokens, channels), frames (batch,) mel lengths
        -> (batch, channels, max(frames)), zero beyond each length."""
        total = int(frames.max())
        x = h.transpose(1, 2)
        if self.causal:
            x = x.repeat_interleave(self.ratio, dim=2)[:, :, :total]
            x = F.pad(x, (0, total - x.shape[2]))
        else:
            x = interpolate(x, total)
        mask = lengths_to_mask(frames, total)
        return self.convs(x) * mask.unsqueeze(1)

    def expand(self, h: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Causal path: h (batch, tokens, channels) -> (batch, channels, tokens * ratio)."""
        return self.convs(h.transpose(1, 2).repeat_interleave(self.ratio, dim=2), cache)

    def inference(self, prompt: torch.Tensor, target: torch.Tensor, prompt_frames: int,
                  target_frames: int, edge: tuple[int, int] | None = None) -> torch.Tensor:
        """Non-causal inference: prompt (1, n1, channels) and target (1, n2, channels) are
        stretched separately to their frame counts -> (1, channels, prompt_frames + target_frames).

        `edge` = (tokens, frames): when the target has more than 2 * tokens tokens (40 for
        v1), its first and last `tokens` tokens are stretched to
        exactly `frames` frames each and only the middle takes up the rest, as the
        reference does so that chunk borders of long utterances line up.
        """
        x = target.transpose(1, 2)
        if edge is not None and target.shape[1] > 2 * edge[0]:
            n, f = edge
            x = torch.cat([interpolate(x[:, :, :n], f),
                           interpolate(x[:, :, n:-n], target_frames - 2 * f),
                           interpolate(x[:, :, -n:], f)], dim=2)
        else:
            x = interpolate(x, target_frames)
        if prompt.shape[1] > 0:
            x = torch.cat([interpolate(prompt.transpose(1, 2), prompt_frames), x], dim=2)
        return self.convs(x)
