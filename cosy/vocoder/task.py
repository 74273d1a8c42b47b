"""The vocoder as a training task: shard rows -> fixed-length audio segments with their
mel (and f0 targets for HiFT).

Training takes a random segment of `model.segment_frames` frames from each utterance,
validation the first one; shorter utterances are zero-padded to the segment length.
f0 targets come from `cosy.vocoder.f0.estimate_f0` (normalised autocorrelation).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import numpy as np
import torch

from cosy.audio import load_audio, mel_spectrogram
from cosy.errors import CosyError
from cosy.train.task import Row, Task
from cosy.vocoder.f0 import estimate_f0
from cosy.vocoder.model import VocoderConfig, VocoderModel

log = logging.getLogger(__name__)


def _decode(cfg: VocoderConfig) -> Callable[[Row], Row | None]:
    def decode(row: Row) -> Row | None:
        try:
            wave, _ = load_audio(row["audio"], cfg.mel.sample_rate)
        except CosyError as err:
            log.warning("utterance %s: %s; skipped", row.get("utt", "?"), err)
            return None
        return {**row, "wave": wave}
    return decode


def segmenter(cfg: VocoderConfig, train: bool, rng: random.Random | None = None) -> Callable[[Row], Row]:
    size = cfg.segment_frames * cfg.mel.hop_length
    rng = rng or random

    def segment(row: Row) -> Row:
        wave = row["wave"]
        start = rng.randint(0, max(0, len(wave) - size)) if train else 0
        wave = np.pad(wave[start:start + size], (0, max(0, start + size - len(wave))))
        return {**row, "wave": wave}
    return segment


def featurizer(cfg: VocoderConfig) -> Callable[[Row], Row]:
    mel_cfg = cfg.mel

    def features(row: Row) -> Row:
        wave = torch.from_numpy(row["wave"])
        mel = mel_spectrogram(wave[None], mel_cfg)[0]
        out = {"utt": row.get("utt", "?"), "audio": wave, "mel": mel}
        if cfg.generator.source is not None:
            f0 = estimate_f0(row["wave"], mel_cfg.sample_rate, mel_cfg.hop_length, mel.shape[-1],
                             cfg.f0_min, cfg.f0_max)
            out["f0"] = torch.from_numpy(f0)
        return out
    return features


def processors(cfg: VocoderConfig, train: bool) -> list[Callable[[Row], Row | None]]:
    pad = (cfg.mel.n_fft - cfg.mel.hop_length) // 2
    if cfg.segment_frames * cfg.mel.hop_length <= pad:
        raise CosyError(f"model.segment_frames={cfg.segment_frames} is too short for the mel window "
                        f"(needs more than {pad} samples)")
    return [_decode(cfg), segmenter(cfg, train), featurizer(cfg)]


def collate(rows: list[Row]) -> dict[str, Any]:
    """Rows of equal segment length -> `audio` (B, samples), `mel` (B, n_mels, frames), `f0` (B, frames)."""
    batch: dict[str, Any] = {"utt": [r["utt"] for r in rows],
                             "audio": torch.stack([r["audio"] for r in rows]),
                             "mel": torch.stack([r["mel"] for r in rows])}
    if "f0" in rows[0]:
        batch["f0"] = torch.stack([r["f0"] for r in rows])
    return batch


TASK = Task(
    name="vocoder",
    config_cls=VocoderConfig,
    build=VocoderModel,
    processors=processors,
    collate=collate,
    num_frames=lambda row: int(row["mel"].shape[-1]),
    gan=True,
)
