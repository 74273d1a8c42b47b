"""The flow decoder as a training task: shard rows -> (tokens, mel, speaker embedding)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from cosy.audio import load_audio, mel_spectrogram
from cosy.errors import CosyError
from cosy.flow.model import FlowConfig, FlowModel
from cosy.train.task import Row, Task

log = logging.getLogger(__name__)


def align(tokens: torch.Tensor, mel: torch.Tensor, cfg: FlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop tokens (n,) and mel (n_mels, frames) to a consistent pair: the tokens the
    audio covers, and the frames those tokens map to (exactly `ratio` each when causal)."""
    frames = mel.shape[1]
    n = min(len(tokens), int(frames / cfg.frames_per_second * cfg.token_rate))
    f = n * cfg.ratio if cfg.causal else min(frames, cfg.frames_for(n))
    return tokens[:n], mel[:, :f]


def processors(cfg: FlowConfig, train: bool):
    def check(row: Row) -> Row | None:
        for key in ("speech_token", "embedding"):
            if row.get(key) is None:
                log.warning("utterance %s has no %s (run `cosy extract ...` first); dropping it",
                            row.get("utt"), key)
                return None
        if len(row["embedding"]) != cfg.spk_dim:
            raise CosyError(f"utterance {row.get('utt')}: embedding has {len(row['embedding'])} values, "
                            f"config key 'model.spk_dim' says {cfg.spk_dim}")
        return row

    def features(row: Row) -> Row | None:
        samples, _ = load_audio(row["audio"], cfg.mel.sample_rate)
        mel = mel_spectrogram(torch.from_numpy(samples)[None], cfg.mel)[0]
        tokens = torch.as_tensor(np.asarray(row["speech_token"], dtype=np.int64))
        if tokens.numel() and int(tokens.max()) >= cfg.vocab_size:
            raise CosyError(f"utterance {row.get('utt')}: speech token {int(tokens.max())} is outside "
                            f"config key 'model.vocab_size' = {cfg.vocab_size}")
        tokens, mel = align(tokens, mel, cfg)
        if len(tokens) == 0:
            return None
        embedding = torch.as_tensor(np.asarray(row["embedding"], dtype=np.float32))
        return {"utt": row["utt"], "speech_token": tokens, "speech_feat": mel, "embedding": embedding}

    return [check, features]


def collate(rows: list[Row]) -> dict:
    """-> speech_token (B, N) + speech_token_len, speech_feat (B, n_mels, T) +
    speech_feat_len, embedding (B, spk_dim); padding is zero."""
    return {
        "speech_token": pad_sequence([r["speech_token"] for r in rows], batch_first=True),
        "speech_token_len": torch.tensor([len(r["speech_token"]) for r in rows]),
        "speech_feat": pad_sequence([r["speech_feat"].T for r in rows], batch_first=True).transpose(1, 2),
        "speech_feat_len": torch.tensor([r["speech_feat"].shape[1] for r in rows]),
        "embedding": torch.stack([r["embedding"] for r in rows]),
    }


TASK = Task(
    name="flow",
    config_cls=FlowConfig,
    build=FlowModel,
    processors=processors,
    collate=collate,
    num_frames=lambda row: int(row["speech_feat"].shape[1]),
)
