"""Audio I/O and the three feature front-ends against independent implementations.

Each front-end is checked twice: against a separate implementation (librosa, NumPy,
kaldi-native-fbank) on random signals, and against tests/fixtures/reference outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import kaldi_native_fbank as knf
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from cosy.audio import (FbankConfig, MelConfig, WhisperMelConfig, fbank_frames, kaldi_fbank, load_audio,
                        matching_warp, mel_frames, mel_spectrogram, save_audio, warp_mel, whisper_frames,
                        whisper_log_mel)
from cosy.errors import CosyError

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "frontend.io.safetensors"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


def _speech_like(num_samples: int, rate: int, seed: int, gain: float = 0.5) -> np.ndarray:
    """A harmonic tone with a slow envelope plus noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / rate
    f0 = 110 + 40 * t
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    wave = gain * (0.3 * tone * envelope + 0.01 * rng.standard_normal(num_samples))
    return wave.astype(np.float32)


# ---------------------------------------------------------------- flow / vocoder mel


def _librosa_mel(wave: np.ndarray, cfg: MelConfig) -> np.ndarray:
    pad = (cfg.n_fft - cfg.hop_length) // 2
    padded = np.pad(wave, (pad, pad), mode="reflect")
    spec = librosa.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                        window="hann", center=False)
    magnitude = np.sqrt(np.abs(spec) ** 2 + 1e-9)
    basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                fmin=cfg.fmin, fmax=cfg.fmax)
    return np.log(np.maximum(basis @ magnitude, 1e-5))


@pytest.mark.parametrize("cfg", [MelConfig.v1(), MelConfig.v2()], ids=["v1", "v2"])
def test_mel_matches_librosa(cfg: MelConfig) -> None:
    wave = _speech_like(cfg.sample_rate // 2 + 77, cfg.sample_rate, seed=1)
    ours = mel_spectrogram(torch.from_numpy(wave)[None], cfg)[0].numpy()
    theirs = _librosa_mel(wave, cfg)
    assert ours.shape == theirs.shape == (cfg.n_mels, mel_frames(len(wave), cfg))
    # Both are float32 FFTs of the same frames; rounding differs by ~1e-6 relative, and the
    # 1e-5 clamp keeps the log away from where that would be amplified: 1e-4 in log units.
    assert np.abs(ours - theirs).max() < 1e-4


def test_mel_matches_reference(reference: dict[str, torch.Tensor]) -> None:
    for cfg, wav, out, frames in [(MelConfig.v1(), "in.wav_22050", "out.mel_v1", 86),
                                  (MelConfig.v2(), "in.wav_24000", "out.mel_v2", 50)]:
        mel = mel_spectrogram(reference[wav], cfg)
        assert mel.shape == (1, 80, frames) == (1, 80, mel_frames(reference[wav].shape[1], cfg))
        # Same operations in the same order in float32: only FFT rounding may differ.
        assert (mel - reference[out]).abs().max() < 1e-5


def test_mel_padded_batch_equals_one_by_one() -> None:
    cfg = MelConfig.v1()
    waves = [torch.from_numpy(_speech_like(n, cfg.sample_rate, seed=n)) for n in (6000, 4100, 5000)]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    lengths = torch.tensor([len(w) for w in waves])
    mel = mel_spectrogram(batch, cfg, lengths)
    assert mel.shape == (3, 80, mel_frames(6000, cfg))
    for row, wave in enumerate(waves):
        alone = mel_spectrogram(wave[None], cfg)[0]
        frames = mel_frames(len(wave), cfg)
        torch.testing.assert_close(mel[row, :, :frames], alone, atol=1e-5, rtol=0)
        assert bool((mel[row, :, frames:] == 0).all())


def test_mel_centred_frame_count() -> None:
    cfg = MelConfig(center=True)
    wave = torch.from_numpy(_speech_like(5000, cfg.sample_rate, seed=3))[None]
    assert mel_spectrogram(wave, cfg).shape[-1] == mel_frames(5000, cfg) == 5000 // 256 + 1


def _harmonics(f0: float, seconds: float, rate: int, formant: float) -> np.ndarray:
    """A voiced sound: harmonics of f0 under one resonance at `formant` Hz."""
    t = np.arange(int(seconds * rate)) / rate
    k = np.arange(1, int(rate / 2 / f0))
    gains = 1.0 / (1.0 + ((k * f0 - formant) / 300.0) ** 2)
    return (0.1 * (gains[:, None] * np.sin(2 * np.pi * f0 * k[:, None] * t[None])).sum(0)).astype(np.float32)


# Whisper's 25 ms window resolves these harmonics less sharply, so less of the distance goes.
@pytest.mark.parametrize("cfg, mel_of, share", [(MelConfig.v1(), mel_spectrogram, 0.4),
                                                (WhisperMelConfig(), whisper_log_mel, 0.6)],
                         ids=["flow-mel", "whisper-log-mel"])
def test_warp_mel_moves_pitch_and_formant_by_the_factor(cfg, mel_of, share) -> None:
    low, high = (mel_of(torch.from_numpy(_harmonics(f0, 0.5, cfg.sample_rate, formant))[None], cfg)
                 for f0, formant in ((160.0, 800.0), (200.0, 1000.0)))
    warped = warp_mel(torch.cat([low, low]), torch.tensor([1.25, 1.0]), cfg)
    torch.testing.assert_close(warped[1], low[0])  # a factor of 1 changes nothing

    def profile(mel: torch.Tensor) -> torch.Tensor:  # time-averaged spectrum, level removed
        mean = mel[:, 2:-2].mean(dim=-1)
        return mean - mean.mean()

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((profile(a) - profile(b)).abs().mean())

    # the 160 Hz voice scaled by 1.25 lands on the 200 Hz voice, and scaled by 0.8 back again
    assert distance(warped[0], high[0]) < share * distance(low[0], high[0])
    restored = warp_mel(warped[:1], torch.tensor([0.8]), cfg)[0]
    assert distance(restored, low[0]) < share * distance(warped[0], low[0])
    padding = torch.full((1, cfg.n_mels, 3), math.log(1e-5))
    torch.testing.assert_close(warp_mel(padding, torch.tensor([1.2]), cfg), padding)


def test_matching_warp_finds_the_semitones_between_two_pitches_of_a_voice() -> None:
    cfg = MelConfig.v1()
    low, high = (mel_spectrogram(torch.from_numpy(_harmonics(f0, 1.0, cfg.sample_rate, formant))[None], cfg)[0]
                 for f0, formant in ((150.0, 800.0), (150.0 * 2 ** 0.25, 800.0 * 2 ** 0.25)))  # 3 semitones
    assert matching_warp(low, low, cfg, 4.0) == 1.0
    assert abs(12 * math.log2(matching_warp(high, low, cfg, 4.0)) + 3) <= 0.3
    assert abs(12 * math.log2(matching_warp(low, high, cfg, 4.0)) - 3) <= 0.3
    six_up = warp_mel(low[None], torch.tensor([2 ** 0.5]), cfg)[0]
    assert abs(12 * math.log2(matching_warp(low, six_up, cfg, 8.0)) - 6) <= 0.1
    assert matching_warp(low, six_up, cfg, 5.9) == 1.0  # the best factor at the limit: out of reach, no warp
    with pytest.raises(CosyError, match="no frames"):
        matching_warp(low[:, :0], low, cfg, 4.0)


# ---------------------------------------------------------------- Whisper log-mel


def _numpy_whisper(wave: np.ndarray, cfg: WhisperMelConfig) -> np.ndarray:
    """Whisper's log-mel written out directly from its formula in NumPy (float64)."""
    half = cfg.n_fft // 2
    padded = np.pad(wave.astype(np.float64), (half, half), mode="reflect")
    count = 1 + (len(padded) - cfg.n_fft) // cfg.hop_length
    starts = np.arange(count) * cfg.hop_length
    frames = np.stack([padded[s:s + cfg.n_fft] for s in starts])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    power = power[:-1].T  # drop the last frame -> (bins, frames)
    basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels).astype(np.float64)
    log_mel = np.log10(np.maximum(basis @ power, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


def test_whisper_matches_numpy() -> None:
    cfg = WhisperMelConfig()
    wave = _speech_like(12345, cfg.sample_rate, seed=2)
    ours = whisper_log_mel(torch.from_numpy(wave)[None], cfg)[0].numpy()
    theirs = _numpy_whisper(wave, cfg)
    assert ours.shape == theirs.shape == (128, whisper_frames(12345, cfg)) == (128, 77)
    # float32 against float64: the log10 of a float32 power is good to ~1e-6 except in
    # near-silent bins, which the max-8 floor removes; after /4 the gap is far below 1e-4.
    assert np.abs(ours - theirs).max() < 1e-4


def test_whisper_matches_reference(reference: dict[str, torch.Tensor]) -> None:
    out = whisper_log_mel(reference["in.wav_16000"], WhisperMelConfig())
    assert out.shape == (1, 128, 100)
    assert (out - reference["out.whisper_logmel128"]).abs().max() < 1e-5


def test_whisper_floor_is_per_utterance_in_a_padded_batch() -> None:
    cfg = WhisperMelConfig()
    loud = torch.from_numpy(_speech_like(16000, 16000, seed=4, gain=1.0))
    quiet = torch.from_numpy(_speech_like(9000, 16000, seed=5, gain=1e-4))
    batch = torch.nn.utils.rnn.pad_sequence([loud, quiet], batch_first=True)
    out = whisper_log_mel(batch, cfg, torch.tensor([16000, 9000]))
    alone = whisper_log_mel(quiet[None], cfg)[0]
    frames = whisper_frames(9000, cfg)
    torch.testing.assert_close(out[1, :, :frames], alone, atol=1e-5, rtol=0)
    assert bool((out[1, :, frames:] == 0).all())
    # The quiet row is 80 dB down, so a batch-wide floor would have flattened it entirely.
    assert float(out[0].max() - out[1, :, :frames].max()) > 1.5
    assert float(out[1, :, :frames].std()) > 0.1


# ---------------------------------------------------------------- Kaldi fbank


def _knf_fbank(wave: np.ndarray, snip_edges: bool) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = snip_edges
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wave.tolist())
    fbank.input_finished()
    return np.stack([np.asarray(fbank.get_frame(i)) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize("snip_edges", [True, False])
def test_fbank_matches_kaldi_native_fbank(snip_edges: bool) -> None:
    wave = _speech_like(8123, 16000, seed=6)
    cfg = FbankConfig(mean_norm=False, snip_edges=snip_edges)
    ours = kaldi_fbank(torch.from_numpy(wave)[None], cfg)[0].numpy()
    theirs = _knf_fbank(wave, snip_edges)
    assert ours.shape == theirs.shape == (fbank_frames(8123, cfg), 80)
    # Different float32 FFTs and filterbank roundings; the log of the energy is compared,
    # so 1e-3 means the mel energies agree to 0.1 %.
    assert np.abs(ours - theirs).max() < 1e-3
    normed = kaldi_fbank(torch.from_numpy(wave)[None], FbankConfig(snip_edges=snip_edges))[0].numpy()
    assert np.abs(normed - (theirs - theirs.mean(axis=0))).max() < 1e-3


def test_fbank_matches_reference(reference: dict[str, torch.Tensor]) -> None:
    wave = reference["in.wav_16000"]
    raw = kaldi_fbank(wave, FbankConfig(mean_norm=False))[0]
    normed = kaldi_fbank(wave, FbankConfig())[0]
    assert raw.shape == normed.shape == (98, 80)
    # The reference's filterbank is built in float32 (ours in float64, then rounded), which
    # moves low-energy bins by up to ~2e-4 in log units.
    assert (raw - reference["out.kaldi_fbank80"]).abs().max() < 1e-3
    assert (normed - reference["out.campplus_input"]).abs().max() < 1e-3
    assert normed.mean(dim=0).abs().max() < 1e-5


def test_fbank_padded_batch_equals_one_by_one() -> None:
    waves = [torch.from_numpy(_speech_like(n, 16000, seed=n)) for n in (7000, 4321)]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    for snip_edges in (True, False):
        cfg = FbankConfig(snip_edges=snip_edges)
        out = kaldi_fbank(batch, cfg, torch.tensor([7000, 4321]))
        frames = fbank_frames(4321, cfg)
        torch.testing.assert_close(out[1, :frames], kaldi_fbank(waves[1][None], cfg)[0], atol=1e-5, rtol=0)
        assert bool((out[1, frames:] == 0).all())


def test_front_ends_reject_bad_shapes() -> None:
    with pytest.raises(CosyError, match="batch, samples"):
        mel_spectrogram(torch.zeros(100), MelConfig())
    with pytest.raises(CosyError, match="too short"):
        whisper_log_mel(torch.zeros(1, 100), WhisperMelConfig())
    with pytest.raises(CosyError, match="shorter than one"):
        kaldi_fbank(torch.zeros(1, 300), FbankConfig())


# ---------------------------------------------------------------- loading


def test_load_audio_downmixes_stereo(tmp_path: Path) -> None:
    left = _speech_like(8000, 16000, seed=7)
    right = _speech_like(8000, 16000, seed=8)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    samples, rate = load_audio(path)
    assert rate == 16000 and samples.shape == (8000,) and samples.dtype == np.float32
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("fmt,subtype,tolerance", [("FLAC", "PCM_16", 1e-4), ("OGG", "VORBIS", None)])
def test_load_audio_reads_flac_and_ogg(tmp_path: Path, fmt: str, subtype: str, tolerance: float | None) -> None:
    wave = _speech_like(16000, 16000, seed=9)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(str(path), wave, 16000, format=fmt, subtype=subtype)
    samples, rate = load_audio(path)
    assert rate == 16000 and len(samples) == len(wave)
    if tolerance is not None:  # 16-bit PCM: one quantisation step is 3e-5
        assert np.abs(samples - wave).max() < tolerance
    else:  # lossy: the waveform only stays close overall
        assert np.corrcoef(samples, wave)[0, 1] > 0.95
    from_bytes, _ = load_audio(path.read_bytes())
    np.testing.assert_array_equal(from_bytes, samples)


def test_load_audio_resamples_to_16k(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    save_audio(path, _speech_like(22050 * 2, 22050, seed=10), 22050)
    samples, rate = load_audio(path, sample_rate=16000)
    assert rate == 16000 and len(samples) == 32000


def test_load_audio_names_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(CosyError, match="broken.wav"):
        load_audio(path)
    with pytest.raises(CosyError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac")
