"""The speaker encoder's input: Kaldi fbank of 16 kHz audio minus its mean over time."""

from __future__ import annotations

import numpy as np
import torch

from cosy.audio import FbankConfig, kaldi_fbank, load_audio

FBANK = FbankConfig()
SAMPLE_RATE = FBANK.sample_rate


def fbank_features(samples: np.ndarray) -> torch.Tensor:
    """Mono 16 kHz samples (n,) -> mean-normalised fbank (frames, n_mels), float32."""
    return kaldi_fbank(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None], FBANK)[0]


def file_features(source) -> torch.Tensor:
    """An audio file (path or bytes), resampled to 16 kHz -> (frames, n_mels); CosyError if unreadable."""
    samples, _ = load_audio(source, SAMPLE_RATE)
    return fbank_features(samples)
