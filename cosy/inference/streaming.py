"""Streaming synthesis: LM tokens -> chunked flow decoding -> streaming vocoder.

Every speech token the LM draws is pushed on at once, so audio starts before the LM
has finished. A causal flow decoder (`model.causal: true`) decodes each chunk once
(`cosy.flow.FlowStream`); a non-causal one is re-run over all tokens so far every
`stream_chunk_tokens` tokens, a chunk that doubles each time (`Redecoder`), as the
published system does. Either way the mel reaches the vocoder's
`StreamingVocoder`, whose output joins without seams.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch

from cosy.audio import MelConfig, matching_warp, warp_mel
from cosy.flow import FlowModel
from cosy.vocoder.hifigan import Generator
from cosy.vocoder.streaming import StreamingVocoder


class Redecoder:
    """Chunked decoding with a non-causal flow model.

    Tokens arrive with `push`; once `chunk_tokens` new tokens have come, the whole target so
    far is decoded again with the same noise, and the frames not yet returned are emitted
    except those of the last `holdback_tokens` tokens, which would still change once their
    right context arrives. The chunk then grows by `growth` (2: 25, 50, 100, ... tokens), so
    that all the decodes together cost a small multiple of one offline decode. `finish` decodes everything and returns the rest, so the frames
    returned in total are exactly as many as `FlowModel.inference` gives for all tokens.
    """

    def __init__(self, model: FlowModel, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, speed: float = 1.0, generator: torch.Generator | None = None,
                 chunk_tokens: int = 25, holdback_tokens: int = 5, growth: float = 2.0):
        """prompt_tokens (1, n1), prompt_feat (1, n_mels, f1), embedding (1, spk_dim)."""
        self.model, self.speed, self.generator = model, speed, generator
        self.prompt_tokens, self.prompt_feat, self.embedding = prompt_tokens, prompt_feat, embedding
        self.chunk_tokens, self.holdback_tokens = max(1, chunk_tokens), max(0, holdback_tokens)
        self.growth = max(1.0, growth)
        self.tokens = prompt_tokens.new_zeros(1, 0)
        self.noise = prompt_feat.new_zeros(1, prompt_feat.shape[1], 0)
        self.decoded = 0   # tokens covered by the last decode
        self.emitted = 0   # target frames returned so far

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (1, n) -> mel (1, n_mels, frames), possibly empty."""
        self.tokens = torch.cat([self.tokens, tokens.to(self.tokens)], dim=1)
        if self.tokens.shape[1] - self.decoded < self.chunk_tokens:
            return self.prompt_feat.new_zeros(1, self.prompt_feat.shape[1], 0)
        keep = self.model.cfg.frames_for(self.tokens.shape[1] - self.holdback_tokens, self.speed)
        self.chunk_tokens = math.ceil(self.chunk_tokens * self.growth)
        return self._decode(keep)

    def finish(self) -> torch.Tensor:
        """The remaining frames (no more tokens will come)."""
        if self.tokens.shape[1] == 0:
            return self.prompt_feat.new_zeros(1, self.prompt_feat.shape[1], 0)
        return self._decode(None)

    def _decode(self, keep: int | None) -> torch.Tensor:
        cfg = self.model.cfg
        frames = self.prompt_feat.shape[2] + cfg.frames_for(self.tokens.shape[1], self.speed)
        if frames > self.noise.shape[2]:
            extra = torch.randn(1, cfg.n_mels, frames - self.noise.shape[2], generator=self.generator,
                                device=self.noise.device)
            self.noise = torch.cat([self.noise, extra], dim=2)
        mel = self.model.inference(self.tokens, self.prompt_tokens, self.prompt_feat, self.embedding,
                                   self.speed, noise=self.noise[:, :, :frames])
        self.decoded = self.tokens.shape[1]
        stop = mel.shape[2] if keep is None else max(self.emitted, min(keep, mel.shape[2]))
        out = mel[:, :, self.emitted:stop]
        self.emitted = stop
        return out


def mel_stream(model: FlowModel, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor, embedding: torch.Tensor,
               speed: float, max_tokens: int, chunk_tokens: int, holdback_tokens: int, growth: float):
    """A `push(tokens) / finish()` mel decoder suited to `model` (see the module docstring)."""
    if model.cfg.causal:
        return model.stream(prompt_tokens, prompt_feat, embedding, max_tokens=prompt_tokens.shape[1] + max_tokens)
    return Redecoder(model, prompt_tokens, prompt_feat, embedding, speed, None, chunk_tokens, holdback_tokens, growth)


class PromptWarp:
    """A `push / finish` mel decoder whose chunks are frequency-warped toward the prompt's
    voice (`synthesis.prompt_warp_semitones`). The factor is fixed on the first chunk: the
    chunks already played cannot change."""

    def __init__(self, decoder, prompt_feat: torch.Tensor, cfg: MelConfig, max_semitones: float):
        """prompt_feat (1, n_mels, frames)."""
        self.decoder, self.prompt_feat, self.cfg, self.max_semitones = decoder, prompt_feat, cfg, max_semitones
        self.factor: torch.Tensor | None = None

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._warped(self.decoder.push(tokens))

    def finish(self) -> torch.Tensor:
        return self._warped(self.decoder.finish())

    def _warped(self, mel: torch.Tensor) -> torch.Tensor:
        if not mel.shape[2]:
            return mel
        if self.factor is None:
            self.factor = mel.new_tensor([matching_warp(mel[0], self.prompt_feat[0], self.cfg, self.max_semitones)])
        return warp_mel(mel, self.factor, self.cfg)


def stream_audio(tokens: Iterable[int], decoder, vocoder: Generator) -> Iterator[np.ndarray]:
    """Speech tokens, as they are drawn -> float32 audio chunks (batch of one)."""
    voice = StreamingVocoder(vocoder)
    started = False
    for mel in _mel_chunks(tokens, decoder):
        started = True
        chunk = voice.push(mel)
        if chunk.shape[1]:
            yield chunk[0].float().cpu().numpy()
    if started:
        yield voice.flush()[0].float().cpu().numpy()


def _mel_chunks(tokens: Iterable[int], decoder) -> Iterator[torch.Tensor]:
    """The non-empty mel chunks (1, n_mels, frames) of `decoder` as tokens arrive, then its rest."""
    for token in tokens:
        mel = decoder.push(torch.tensor([[token]]))
        if mel.shape[2]:
            yield mel
    mel = decoder.finish()
    if mel.shape[2]:
        yield mel
