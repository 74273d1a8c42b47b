"""The speaker encoder as a training task: shard rows -> fixed-length fbank crops + labels."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from cosy.audio import load_audio
from cosy.errors import CosyError
from cosy.speaker.features import SAMPLE_RATE, fbank_features
from cosy.speaker.model import SpeakerConfig, SpeakerModel
from cosy.train.task import Row, Task

log = logging.getLogger(__name__)


def read_speakers(path: str, key: str = "model.speakers") -> dict[str, int]:
    """Speaker id -> class index from the first column of `path` (a spk2utt or a list),
    given by config key `key`."""
    if not path:
        raise CosyError(f"config key '{key}' is empty: give the training data dir's spk2utt")
    file = Path(path)
    if not file.is_file():
        raise CosyError(f"config key '{key}': file not found: {file}")
    index: dict[str, int] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if fields[0] in index:
            raise CosyError(f"{file}:{number}: speaker '{fields[0]}' is listed twice")
        index[fields[0]] = len(index)
    if len(index) < 2:
        raise CosyError(f"{file}: needs at least 2 speakers to train a classifier, found {len(index)}")
    return index


def crop(samples: np.ndarray, length: int, train: bool) -> np.ndarray:
    """A `length`-sample piece: random in training, the centre otherwise; short audio is looped."""
    if len(samples) < length:
        samples = np.tile(samples, -(-length // len(samples)))
    start = random.randint(0, len(samples) - length) if train else (len(samples) - length) // 2
    return samples[start:start + length]


def build(cfg: SpeakerConfig) -> SpeakerModel:
    return SpeakerModel(cfg, num_speakers=len(read_speakers(cfg.speakers)))


def processors(cfg: SpeakerConfig, train: bool):
    speakers = read_speakers(cfg.speakers)
    length = round(cfg.segment_seconds * SAMPLE_RATE)
    n_mels = cfg.encoder.feat_dim
    unknown: set[str] = set()

    def label(row: Row) -> Row | None:
        if row["spk"] not in speakers:
            if row["spk"] not in unknown:
                unknown.add(row["spk"])
                log.warning("speaker '%s' is not in %s; dropping its utterances", row["spk"], cfg.speakers)
            return None
        return {"utt": row["utt"], "label": speakers[row["spk"]], "audio": row["audio"]}

    def features(row: Row) -> Row:
        samples, _ = load_audio(row["audio"], SAMPLE_RATE)
        feats = fbank_features(crop(samples, length, train), n_mels)
        return {"utt": row["utt"], "label": row["label"], "feats": feats}

    return [label, features]


def collate(rows: list[Row]) -> dict:
    """Crops all have the configured length, so the batch needs no padding.

    -> feats (batch, frames, n_mels), labels (batch,)
    """
    return {
        "feats": torch.stack([r["feats"] for r in rows]),
        "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
    }


TASK = Task(
    name="speaker",
    config_cls=SpeakerConfig,
    build=build,
    processors=processors,
    collate=collate,
    num_frames=lambda row: int(row["feats"].shape[0]),
)
