"""DNSMOS speech-quality estimates through the pip package speechmos (ships its ONNX models)."""

from __future__ import annotations

import numpy as np

from cosy.audio import resample
from cosy.errors import CosyError

DNSMOS_SAMPLE_RATE = 16000


def dnsmos(samples: np.ndarray, sample_rate: int) -> dict[str, float]:
    """Return {"ovrl", "sig", "bak", "p808"} MOS estimates (1-5) for one mono signal."""
    try:
        from speechmos import dnsmos as model
    except ImportError as err:
        raise CosyError("DNSMOS needs the pip package speechmos (pip install 'cosy[eval]')") from err
    audio = np.clip(resample(np.asarray(samples, dtype=np.float32), sample_rate, DNSMOS_SAMPLE_RATE), -1, 1)
    scores = model.run(audio, DNSMOS_SAMPLE_RATE)
    return {key: float(scores[f"{key}_mos"]) for key in ("ovrl", "sig", "bak", "p808")}
