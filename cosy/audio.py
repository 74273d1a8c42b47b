"""Audio I/O and the three feature front-ends of cosy.

Loading uses soundfile (wav, flac, ogg), downmixes to mono and resamples with soxr.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from cosy.errors import CosyError


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
        raise CosyError(f"cannot read audio {name}: {err}") from err
    if data.shape[0] == 0:
        raise CosyError(f"audio file {name} has no samples")
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and sample_rate != rate:
        samples, rate = resample(samples, rate, sample_rate), sample_rate
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample 1-D float audio with soxr (high quality)."""
    if orig_rate == target_rate:
        return samples
    return soxr.resample(samples, orig_rate, target_rate, quality="HQ").astype(np.float32)


def save_audio(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio as 16-bit PCM WAV (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")
