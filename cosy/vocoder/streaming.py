"""Chunk-by-chunk synthesis that equals offline synthesis.

A generator sample depends on the mel frames within `Generator.receptive_frames()` of it
(convolutions) and, for HiFT, on the whole f0 history (the sine phase is a running sum).
`StreamingVocoder` therefore re-runs the generator on a window of recent frames: it
emits the samples of frames that have `lookahead` frames to their right, keeps `context`
already-emitted frames on their left, and carries the f0 of emitted frames and the phase
reached before the window. HiFT's random draws are made once per stream (start phases)
and once per frame (excitation noise, kept with the window), so a recomputed frame sees
the same noise as before. With context and lookahead at least the receptive field (the
default), every emitted sample equals the offline one given the same draws, up to float
rounding, so joins are seamless; smaller values trade exactness for latency.
"""

from __future__ import annotations

import torch

from cosy.errors import CosyError
from cosy.vocoder.hifigan import Generator


class StreamingVocoder:
    """`push(mel_chunk)` -> new samples `(batch, n)`; `flush()` -> the rest."""

    def __init__(self, generator: Generator, context: int | None = None, lookahead: int | None = None,
                 stochastic: bool = True):
        reach = generator.receptive_frames()
        self.generator = generator
        self.context = reach if context is None else context
        self.lookahead = reach if lookahead is None else lookahead
        if self.context < 0 or self.lookahead < 0:
            raise CosyError("streaming context and lookahead must be >= 0 frames")
        self.stochastic = stochastic
        self.mel: torch.Tensor | None = None   # (batch, n_mels, frames) from `start` on
        self.start = 0                         # absolute index of self.mel's first frame
        self.emitted = 0                       # frames whose samples were returned
        self.f0: torch.Tensor | None = None    # (batch, emitted - start) f0 of emitted frames
        self.offset: torch.Tensor | None = None   # (batch, harmonics + 1) cycles before `start`
        self.uniform: torch.Tensor | None = None  # start phases, drawn once per stream
        self.noise: torch.Tensor | None = None    # (batch, samples of self.mel, harmonics + 1)

    @torch.no_grad()
    def push(self, mel: torch.Tensor) -> torch.Tensor:
        """Add frames `(batch, n_mels, n)`; returns the samples that became final."""
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], dim=-1)
        source = self.generator.source
        if source is not None and self.stochastic:
            shape = (mel.shape[0], mel.shape[-1] * self.generator.hop, source.multiples.numel())
            noise = torch.randn(shape, device=mel.device)
            self.noise = noise if self.noise is None else torch.cat([self.noise, noise], dim=1)
        return self._emit(self.start + self.mel.shape[-1] - self.lookahead)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """The samples of all remaining frames (the stream ends here)."""
        if self.mel is None:
            raise CosyError("flush() called before any mel was pushed")
        return self._emit(self.start + self.mel.shape[-1])

    def _emit(self, until: int) -> torch.Tensor:
        gen, hop = self.generator, self.generator.hop
        batch = self.mel.shape[0]
        if until <= self.emitted:
            return self.mel.new_zeros(batch, 0)
        known = self.emitted - self.start
        if gen.source is None:
            wave = gen.decode(self.mel)
        else:
            f0 = gen.predict_f0(self.mel)
            if known:
                # frames near the window's left edge lack context: use their final f0
                f0 = torch.cat([self.f0, f0[:, known:]], dim=1)
            if self.offset is None:
                harmonics = gen.source.multiples.numel()
                self.offset = f0.new_zeros(batch, harmonics, dtype=torch.float64)
                self.uniform = torch.rand(batch, harmonics, device=f0.device)
            source = gen.make_source(f0, uniform=self.uniform, gaussian=self.noise, offset=self.offset,
                                     stochastic=self.stochastic)
            wave = gen.decode(self.mel, source)
            new_f0 = f0[:, known:until - self.start]
            self.f0 = new_f0 if self.f0 is None else torch.cat([self.f0, new_f0], dim=1)
        out = wave[:, known * hop:(until - self.start) * hop]
        self.emitted = until
        self._trim(max(self.start, until - self.context))
        return out

    def _trim(self, new_start: int) -> None:
        drop = new_start - self.start
        if drop <= 0:
            return
        if self.f0 is not None:
            self.offset = self.offset + self.generator.source.cycles_per_frame(self.f0[:, :drop]).sum(dim=1)
            self.f0 = self.f0[:, drop:]
        if self.noise is not None:
            self.noise = self.noise[:, drop * self.generator.hop:]
        self.mel = self.mel[..., drop:]
        self.start = new_start
