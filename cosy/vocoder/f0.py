"""A fast f0 estimator for the HiFT f0 targets: normalised autocorrelation per frame.

pYIN is accurate but far too slow for a data loader; this picks the shortest-lag strong
autocorrelation peak in the allowed lag range (with parabolic refinement) and calls a
frame voiced when that peak's normalised value and the frame's energy are high enough.
Frames line up with the vocoder mel (frame i is centred on sample i * hop).
"""

from __future__ import annotations

import numpy as np


def estimate_f0(wave: np.ndarray, sample_rate: int, hop: int, frames: int, fmin: float = 60.0,
                fmax: float = 600.0, voicing: float = 0.5, silence_db: float = -50.0) -> np.ndarray:
    """f0 in Hz per frame `(frames,)` of a mono float signal; 0 where unvoiced."""
    max_lag = int(np.ceil(sample_rate / fmin))
    min_lag = max(2, int(sample_rate / fmax))
    width = 2 * max_lag
    padded = np.pad(np.asarray(wave, dtype=np.float64), (width // 2, width // 2 + hop * frames))
    starts = np.arange(frames) * hop
    windows = padded[starts[:, None] + np.arange(width)[None, :]]
    windows = windows - windows.mean(axis=1, keepdims=True)
    size = 1 << (2 * width - 1).bit_length()
    spectrum = np.fft.rfft(windows, size, axis=1)
    acf = np.fft.irfft(spectrum.real ** 2 + spectrum.imag ** 2, size, axis=1)[:, :max_lag + 2]
    # unbiased normalisation: each lag sees fewer overlapping samples
    acf = acf / (width - np.arange(acf.shape[1]))[None, :]
    energy = acf[:, 0]
    norm = acf / np.maximum(energy[:, None], 1e-12)
    search = norm[:, min_lag:max_lag + 1]
    # multiples of the period peak almost as high: take the shortest lag near the best
    # one, then climb to its local maximum
    first = np.argmax(search >= 0.9 * search.max(axis=1, keepdims=True), axis=1)
    for _ in range(max_lag):
        ahead = search[np.arange(frames), np.minimum(first + 1, search.shape[1] - 1)]
        climb = ahead > search[np.arange(frames), first]
        if not climb.any():
            break
        first = first + climb
    lag = first + min_lag
    peak = norm[np.arange(frames), lag]
    left, right = norm[np.arange(frames), lag - 1], norm[np.arange(frames), lag + 1]
    curvature = left - 2 * peak + right
    shift = np.where(curvature < 0, 0.5 * (left - right) / np.where(curvature < 0, curvature, -1.0), 0.0)
    f0 = sample_rate / (lag + np.clip(shift, -0.5, 0.5))
    loud = 10 * np.log10(np.maximum(energy, 1e-20)) > silence_db
    return np.where((peak > voicing) & loud, f0, 0.0).astype(np.float32)
