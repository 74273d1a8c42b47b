"""An independent speaker-similarity judge: the pretrained Resemblyzer voice encoder.

For measurement only (speaker similarity of synthesised speech, a second opinion on
trial lists); cosy's models never condition on it. Install with
`pip install webrtcvad-wheels resemblyzer` (the `eval` extra).
"""

from __future__ import annotations

import numpy as np

from cosy.audio import resample
from cosy.errors import CosyError

INSTALL_HINT = "pip install webrtcvad-wheels resemblyzer"


def available() -> bool:
    try:
        import resemblyzer  # noqa: F401
    except ImportError:
        return False
    return True


class ResemblyzerJudge:
    """embed(wav) -> unit vector; similarity(a, b) -> cosine in [-1, 1]."""

    def __init__(self, device: str = "cpu"):
        try:
            from resemblyzer import VoiceEncoder, preprocess_wav
        except ImportError as err:
            raise CosyError(f"the resemblyzer judge is not installed ({INSTALL_HINT}): {err}") from err
        self._preprocess = preprocess_wav
        self.encoder = VoiceEncoder(device, verbose=False)
        self.sample_rate = 16000

    def embed(self, wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        """Mono float audio (samples,) at `sample_rate` -> L2-normalised embedding (256,)."""
        wav = resample(np.asarray(wav, dtype=np.float32), sample_rate, self.sample_rate)
        # Resemblyzer normalises loudness and cuts long silences before embedding.
        trimmed = self._preprocess(wav, source_sr=self.sample_rate)
        if len(trimmed) == 0:
            raise CosyError("resemblyzer judge: no speech found in the audio")
        return self.encoder.embed_utterance(trimmed).astype(np.float32)

    def similarity(self, wav_a: np.ndarray, wav_b: np.ndarray, sample_rate: int = 16000) -> float:
        return float(self.embed(wav_a, sample_rate) @ self.embed(wav_b, sample_rate))
