"""Audio I/O and the three feature front-ends of cosy.

Loading uses soundfile (wav, flac, ogg), downmixes to mono and resamples with soxr.
Features, each a pure function of a waveform batch with its config dataclass:

* `mel_spectrogram` / `MelConfig`: log magnitude mel of the flow decoder and vocoder;
* `whisper_log_mel` / `WhisperMelConfig`: the S3 speech tokenizer's input;
* `kaldi_fbank` / `FbankConfig`: Kaldi filterbank of the speaker encoder.

Filterbanks and windows are built once per config, device and dtype.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import librosa
import numpy as np
import soundfile as sf
import soxr
import torch

from cosy.errors import CosyError
from cosy.modules.masks import lengths_to_mask


def load_audio(source: str | Path | bytes, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file (path or raw file bytes) as mono float32 in [-1, 1].

    Returns `(samples, rate)`; with `sample_rate` given the audio is resampled to it.
    Raises CosyError naming the file when it is missing, unreadable or empty.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise CosyError(f"audio file not found: {name}")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for bad files
        detail = str(err).replace(f"Error opening {handle!r}: ", "")  # a buffer's repr says nothing
        raise CosyError(f"cannot read audio {name}: {detail}") from err
    if data.shape[0] == 0:
        raise CosyError(f"audio file {name} has no samples")
    if not np.isfinite(data).all():  # float files can hold them, and they would poison every feature
        raise CosyError(f"audio file {name} has NaN or infinite samples")
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and sample_rate != rate:
        samples, rate = resample(samples, rate, sample_rate), sample_rate
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample 1-D float audio with soxr (high quality)."""
    if orig_rate == target_rate:
        return samples
    return soxr.resample(samples, orig_rate, target_rate, quality="HQ").astype(np.float32)


def encode_audio(samples: np.ndarray, sample_rate: int, format: str = "WAV") -> bytes:
    """Mono float audio as the bytes of a 16-bit PCM file: "WAV", or "RAW" for the bare
    little-endian samples (what a WAV holds after its header)."""
    buffer = io.BytesIO()
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    sf.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format=format, subtype="PCM_16", endian="LITTLE")
    return buffer.getvalue()


def check_audio_path(path: str | Path, option: str) -> None:
    """CosyError unless `path`'s extension names a format that `save_audio` writes."""
    kind = Path(path).suffix.lstrip(".").upper()
    if kind not in sf.available_formats() or not sf.check_format(kind, "PCM_16"):
        raise CosyError(f"{option} {path}: the extension must name a 16-bit PCM audio format (.wav, .flac)")


def save_audio(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio as 16-bit PCM in the format of `path`'s extension (.wav,
    .flac; creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")


# --------------------------------------------------------------------------------------
# Feature front-ends. Each is a pure function over a batch of waveforms `(batch, samples)`
# with an optional `lengths` tensor `(batch,)` of valid samples; padded frames come out as
# zeros, and every valid frame equals what the utterance alone would give.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MelConfig:
    """Mel spectrogram of the flow decoder and the vocoder (log of the magnitude mel)."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    center: bool = False

    @classmethod
    def v1(cls) -> "MelConfig":
        return cls()

    @classmethod
    def v2(cls) -> "MelConfig":
        return cls(sample_rate=24000, n_fft=1920, hop_length=480, win_length=1920)


@dataclass(frozen=True)
class WhisperMelConfig:
    """Whisper-style log-mel, the input of the S3 speech tokenizer."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128
    dynamic_range: float = 8.0  # in log10 units: 80 dB below the utterance's peak

    # Whisper's filterbank spans the whole band; these let `warp_mel` take either config.
    @property
    def fmin(self) -> float:
        return 0.0

    @property
    def fmax(self) -> float:
        return self.sample_rate / 2


@dataclass(frozen=True)
class FbankConfig:
    """Kaldi-compatible log-mel filterbank, the input of the speaker encoder."""

    sample_rate: int = 16000
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means offset from the Nyquist frequency, as in Kaldi
    dither: float = 0.0
    preemphasis: float = 0.97
    remove_dc: bool = True
    window: Literal["povey", "hann", "hamming"] = "povey"
    snip_edges: bool = True
    mean_norm: bool = True

    @property
    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def frame_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def padded_length(self) -> int:
        return 1 << (self.frame_length - 1).bit_length()


def mel_frames(num_samples: int | torch.Tensor, cfg: MelConfig) -> int | torch.Tensor:
    """Number of frames `mel_spectrogram` gives for `num_samples` samples (int or tensor)."""
    return num_samples // cfg.hop_length + (1 if cfg.center else 0)


def warp_mel(mel: torch.Tensor, factors: torch.Tensor, cfg: MelConfig | WhisperMelConfig) -> torch.Tensor:
    """Scale the frequency axis of log mels `(batch, n_mels, frames)` by `factors` `(batch,)`.

    Bin k takes the value found at its centre frequency / factor (linear between bin
    centres; beyond the first or last centre, that bin's value), so a factor above 1 raises
    pitch and formants together, as a shorter vocal tract or sox `pitch` would.
    """
    n_mels = mel.shape[1]
    centres = torch.from_numpy(librosa.mel_frequencies(n_mels=n_mels + 2, fmin=cfg.fmin, fmax=cfg.fmax)[1:-1])
    centres = centres.to(device=mel.device, dtype=mel.dtype)
    source = centres[None, :] / factors[:, None].to(mel.dtype)                 # (batch, n_mels) Hz
    upper = torch.searchsorted(centres, source.contiguous()).clamp(1, n_mels - 1)
    lower = upper - 1
    frac = ((source - centres[lower]) / (centres[upper] - centres[lower])).clamp(0.0, 1.0)
    frames = mel.shape[2]
    below = mel.gather(1, lower[:, :, None].expand(-1, -1, frames))
    above = mel.gather(1, upper[:, :, None].expand(-1, -1, frames))
    return below + frac[:, :, None] * (above - below)


@dataclass
class FrequencyWarpConfig:
    """Training augmentation: with probability `prob` an item's log mel has its frequency
    axis scaled by a factor drawn log-uniformly from [1 / max_factor, max_factor]
    (`warp_mel`: pitch and formants move together), so the same words and tokens also come
    in voices the corpus does not have. Off by default."""

    prob: float = 0.0
    max_factor: float = 1.25

    def check(self, key: str) -> None:
        if not (0.0 <= self.prob <= 1.0 and self.max_factor >= 1.0):
            raise CosyError(f"{key}.prob must be in [0, 1] and {key}.max_factor at least 1, got "
                            f"{self.prob} and {self.max_factor}")


def random_warp(mel: torch.Tensor, warp: FrequencyWarpConfig,
                cfg: MelConfig | WhisperMelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`warp` applied to a random share of the log mels `(batch, n_mels, frames)` ->
    (mel, which items were warped `(batch,)` bool); `mel` itself when none was drawn."""
    b = mel.shape[0]
    chosen = torch.rand(b, device=mel.device) < warp.prob if warp.prob > 0 else \
        torch.zeros(b, dtype=torch.bool, device=mel.device)
    if not bool(chosen.any()):
        return mel, chosen
    log_factor = (2 * torch.rand(b, device=mel.device) - 1) * math.log(warp.max_factor)
    factors = torch.where(chosen, log_factor.exp(), torch.ones_like(log_factor))
    return warp_mel(mel, factors, cfg), chosen


def long_term_spectrum(mel: torch.Tensor, loud_share: float = 0.7) -> torch.Tensor:
    """Mean log mel `(n_mels,)` of the loudest `loud_share` of the frames of `mel`
    `(n_mels, frames)`, less its mean over bins: the spectral shape of a voice, without
    its silences or its level."""
    if mel.shape[1] == 0:
        raise CosyError("long_term_spectrum: the mel has no frames")
    loud = mel.mean(0).topk(max(1, int(loud_share * mel.shape[1]))).indices
    shape = mel[:, loud].mean(1)
    return shape - shape.mean()


def matching_warp(mel: torch.Tensor, reference: torch.Tensor, cfg: MelConfig, max_semitones: float,
                  step_semitones: float = 0.1) -> float:
    """The `warp_mel` factor, at most `max_semitones` either way, that brings the long-term
    spectrum of `mel` `(n_mels, frames)` nearest (squared error) to that of `reference`
    `(n_mels, frames')`: a vocal-tract-length match of two recordings' voices. A best
    factor at the limit means no warp within reach explains the difference: then 1.

    Between two recordings of one sox-pitched voice it finds 0 +- 0.5 semitones, between
    two sox pitches of one voice their difference (recipes/mini/RESULTS.md)."""
    steps = int(round(max_semitones / step_semitones))
    semitones = torch.arange(-steps, steps + 1, device=mel.device, dtype=torch.float32) * step_semitones
    factors = 2.0 ** (semitones / 12)
    shape = long_term_spectrum(mel.float())
    candidates = warp_mel(shape[None, :, None].expand(len(factors), -1, 1), factors, cfg)[:, :, 0]
    candidates = candidates - candidates.mean(1, keepdim=True)
    error = (candidates - long_term_spectrum(reference.float())[None]).pow(2).mean(1)
    best = int(error.argmin())
    return 1.0 if best in (0, len(factors) - 1) else float(factors[best])


def mel_spectrogram(wave: torch.Tensor, cfg: MelConfig, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Log magnitude mel of `wave` (batch, samples) -> (batch, n_mels, frames).

    Without centring the signal is still reflect-padded by (n_fft - hop) / 2 on each side,
    so that frame i is centred near sample i * hop and there are samples // hop frames.
    """
    pad = cfg.n_fft // 2 if cfg.center else (cfg.n_fft - cfg.hop_length) // 2
    lengths = _lengths(wave, lengths)
    padded = _pad_per_utterance(wave, lengths, pad, pad, symmetric=False)
    window = _window("hann", cfg.win_length, wave.device, wave.dtype)
    spec = torch.stft(padded, cfg.n_fft, cfg.hop_length, cfg.win_length, window, center=False,
                      return_complex=True)
    magnitude = torch.sqrt(spec.real.square() + spec.imag.square() + 1e-9)
    basis = _slaney_mel_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax,
                              wave.device, wave.dtype)
    mel = torch.log(torch.clamp(basis @ magnitude, min=1e-5))
    frames = mel_frames(lengths, cfg)
    return _mask_frames(mel[..., :int(frames.max())], frames)


def whisper_frames(num_samples: int | torch.Tensor, cfg: WhisperMelConfig) -> int | torch.Tensor:
    """Number of frames `whisper_log_mel` gives for `num_samples` samples (int or tensor)."""
    return num_samples // cfg.hop_length


def whisper_log_mel(wave: torch.Tensor, cfg: WhisperMelConfig,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Whisper log-mel of `wave` (batch, samples) -> (batch, n_mels, frames).

    The dynamic-range floor uses each utterance's own maximum over its valid frames, so a
    padded batch gives the same features as one utterance at a time.
    """
    lengths = _lengths(wave, lengths)
    half = cfg.n_fft // 2
    padded = _pad_per_utterance(wave, lengths, half, half, symmetric=False)
    window = _window("hann", cfg.n_fft, wave.device, wave.dtype)
    spec = torch.stft(padded, cfg.n_fft, cfg.hop_length, window=window, center=False, return_complex=True)
    # Whisper drops the last centred frame, which leaves exactly samples // hop frames.
    power = spec[..., :-1].abs().square()
    basis = _slaney_mel_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, 0.0, cfg.sample_rate / 2,
                              wave.device, wave.dtype)
    log_mel = torch.log10(torch.clamp(basis @ power, min=1e-10))
    frames = whisper_frames(lengths, cfg)
    log_mel = log_mel[..., :int(frames.max())]
    valid = lengths_to_mask(frames, log_mel.shape[-1])[:, None, :]
    peak = log_mel.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    log_mel = torch.maximum(log_mel, peak - cfg.dynamic_range)
    return _mask_frames((log_mel + 4.0) / 4.0, frames)


def fbank_frames(num_samples: int, cfg: FbankConfig) -> int:
    """Number of frames `kaldi_fbank` gives for `num_samples` samples."""
    if cfg.snip_edges:
        return max(0, 1 + (num_samples - cfg.frame_length) // cfg.frame_shift)
    return (num_samples + cfg.frame_shift // 2) // cfg.frame_shift


def kaldi_fbank(wave: torch.Tensor, cfg: FbankConfig, lengths: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaldi log-mel filterbank of `wave` (batch, samples) in [-1, 1] -> (batch, frames, n_mels).

    With `cfg.mean_norm` each utterance's mean over its valid frames is subtracted, which
    is what the speaker encoder expects. `generator` seeds the dither noise, if any.
    """
    lengths = _lengths(wave, lengths)
    frames = torch.tensor([fbank_frames(int(n), cfg) for n in lengths], device=wave.device)
    num_frames = int(frames.max())
    if num_frames == 0:
        raise CosyError(f"kaldi_fbank: audio shorter than one {cfg.frame_length_ms} ms frame")
    if cfg.snip_edges:
        padded = wave
    else:
        # Frame i is centred on sample (i + 1/2) * shift; Kaldi mirrors the edge samples.
        left = cfg.frame_length // 2 - cfg.frame_shift // 2
        right = max(0, (num_frames - 1) * cfg.frame_shift + cfg.frame_length - left - wave.shape[-1])
        padded = _pad_per_utterance(wave, lengths, left, right, symmetric=True)
    chunks = padded.unfold(-1, cfg.frame_length, cfg.frame_shift)[:, :num_frames]
    if cfg.dither > 0:
        chunks = chunks + cfg.dither * torch.randn(chunks.shape, generator=generator, device=wave.device)
    if cfg.remove_dc:
        chunks = chunks - chunks.mean(dim=-1, keepdim=True)
    if cfg.preemphasis > 0:
        previous = torch.cat([chunks[..., :1], chunks[..., :-1]], dim=-1)
        chunks = chunks - cfg.preemphasis * previous
    chunks = chunks * _window(cfg.window, cfg.frame_length, wave.device, wave.dtype)
    power = torch.fft.rfft(chunks, n=cfg.padded_length).abs().square()
    banks = _kaldi_mel_banks(cfg, wave.device, wave.dtype)
    # Kaldi floors the energies at float32 epsilon before the log.
    fbank = torch.log(torch.clamp(power[..., :-1] @ banks.T, min=torch.finfo(torch.float32).eps))
    valid = lengths_to_mask(frames, num_frames)[:, :, None]
    if cfg.mean_norm:
        mean = fbank.masked_fill(~valid, 0.0).sum(dim=1, keepdim=True) / frames[:, None, None]
        fbank = fbank - mean
    return fbank.masked_fill(~valid, 0.0)


def _lengths(wave: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if wave.dim() != 2:
        raise CosyError(f"expected a waveform batch (batch, samples), got shape {tuple(wave.shape)}")
    if lengths is None:
        return torch.full((wave.shape[0],), wave.shape[1], dtype=torch.long, device=wave.device)
    return lengths.to(device=wave.device, dtype=torch.long)


def _pad_per_utterance(wave: torch.Tensor, lengths: torch.Tensor, left: int, right: int,
                       symmetric: bool) -> torch.Tensor:
    """Mirror-pad each row about its own ends: `(batch, left + samples + right)`.

    symmetric=False repeats no edge sample (torch's "reflect"); True repeats it (Kaldi).
    Padding in the batch beyond a row's length is replaced by that row's reflection.
    """
    if bool((lengths <= max(left, right)).any()):
        raise CosyError(f"audio of {int(lengths.min())} samples is too short to pad by {max(left, right)}")
    position = torch.arange(-left, wave.shape[1] + right, device=wave.device)[None, :]
    n = lengths[:, None]
    shift = 1 if symmetric else 0
    index = torch.where(position < 0, -position - shift, position)
    index = torch.where(index >= n, 2 * (n - 1) - index + shift, index)
    return torch.gather(wave, 1, index.clamp(0, wave.shape[1] - 1))


def _mask_frames(features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Zero the frames of `features` (batch, channels, time) beyond each row's count."""
    return features.masked_fill(~lengths_to_mask(frames, features.shape[-1])[:, None, :], 0.0)


@functools.lru_cache(maxsize=32)
def _window(kind: str, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if kind == "hann":
        return torch.hann_window(length, periodic=True, device=device, dtype=dtype)
    if kind == "povey":  # Kaldi: a symmetric Hann window raised to 0.85
        return torch.hann_window(length, periodic=False, device=device, dtype=dtype).pow(0.85)
    if kind == "hamming":
        return torch.hamming_window(length, periodic=False, device=device, dtype=dtype)
    raise CosyError(f"unknown window '{kind}' (choose povey, hann or hamming)")


@functools.lru_cache(maxsize=32)
def _slaney_mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                      device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) Slaney-style mel filterbank, as librosa builds it."""
    basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    return torch.from_numpy(basis).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _kaldi_mel_banks(cfg: FbankConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_mels, padded_length // 2) triangles evenly spaced on Kaldi's mel scale.

    Kaldi leaves out the Nyquist bin, so the callers drop it from the spectrum too.
    """
    def mel(freq: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(freq / 700.0)

    nyquist = cfg.sample_rate / 2
    high = cfg.high_freq if cfg.high_freq > 0 else nyquist + cfg.high_freq
    low_mel, high_mel = mel(torch.tensor([cfg.low_freq, high], dtype=torch.float64))
    edges = torch.linspace(low_mel, high_mel, cfg.n_mels + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bins = cfg.padded_length // 2
    fft_mel = mel(torch.arange(bins, dtype=torch.float64) * cfg.sample_rate / cfg.padded_length)[None, :]
    rising = (fft_mel - left) / (centre - left)
    falling = (right - fft_mel) / (right - centre)
    banks = torch.where(fft_mel <= centre, rising, falling)
    banks = torch.where((fft_mel > left) & (fft_mel < right), banks, torch.zeros_like(banks))
    return banks.to(device=device, dtype=dtype)
