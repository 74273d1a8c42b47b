"""The speaker encoder's input: Kaldi fbank of 16 kHz audio minus its mean over time.

The number of mel bins follows the network's `feat_dim`; the released models use 80.
"""

from __future__ import annotations

import numpy as np
import torch

from cosy.audio import FbankConfig, kaldi_fbank, load_audio

SAMPLE_RATE = FbankConfig().sample_rate


def fbank_features(samples: np.ndarray, n_mels: int) -> torch.Tensor:
    """Mono 16 kHz samples (n,) -> mean-normalised fbank (frames, n_mels), float32."""
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
    return kaldi_fbank(wave, FbankConfig(n_mels=n_mels, mean_norm=True))[0]


def file_features(source, n_mels: int) -> torch.Tensor:
    """An audio file (path or bytes), resampled to 16 kHz -> (frames, n_mels); CosyError if unreadable."""
    samples, _ = load_audio(source, SAMPLE_RATE)
    return fbank_features(samples, n_mels)
