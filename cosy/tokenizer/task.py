"""The S3 tokenizer as a training task: shard rows (audio bytes + text) -> log-mel + BPE ids."""

from __future__ import annotations

import logging

import torch
from torch.nn.utils.rnn import pad_sequence

from cosy.audio import load_audio
from cosy.errors import CosyError
from cosy.speaker.task import read_speakers
from cosy.tokenizer.model import TRAINING_ONLY, TokenizerConfig, TokenizerModel, load_text_tokenizer, log_mel
from cosy.train.task import Row, Task

log = logging.getLogger(__name__)


def speaker_index(cfg: TokenizerConfig) -> dict[str, int]:
    """The adversary's speakers -> class indices; empty when the adversary is off."""
    return read_speakers(cfg.adversary.speakers, "model.adversary.speakers") if cfg.adversary.weight > 0 else {}


def build(cfg: TokenizerConfig) -> TokenizerModel:
    return TokenizerModel(cfg, num_speakers=len(speaker_index(cfg)))


def processors(cfg: TokenizerConfig, train: bool):
    text_tokenizer = load_text_tokenizer(cfg)
    speakers = speaker_index(cfg)
    max_samples = round(cfg.max_seconds * cfg.mel.sample_rate)

    def features(row: Row) -> Row | None:
        try:
            samples, _ = load_audio(row["audio"], cfg.mel.sample_rate)
        except CosyError as err:
            log.warning("utterance %s: %s; skipped", row.get("utt"), err)
            return None
        if len(samples) > max_samples or len(samples) <= cfg.mel.n_fft // 2:
            log.warning("utterance %s: %.2f s is outside (0, %g] s; skipped",
                        row.get("utt"), len(samples) / cfg.mel.sample_rate, cfg.max_seconds)
            return None
        feats = log_mel(torch.from_numpy(samples)[None], cfg)[0]
        out = {"utt": row["utt"], "text": row["text"], "feats": feats}
        if speakers:
            out["speaker"] = speakers.get(row["spk"], -1)
        return out

    def text_ids(row: Row) -> Row | None:
        ids = text_tokenizer.encode(row["text"])
        if not ids:
            log.warning("utterance %s: empty transcript; skipped", row["utt"])
            return None
        return {**row, "text_ids": torch.tensor(ids, dtype=torch.long)}

    return [features, text_ids]


def collate(rows: list[Row]) -> dict:
    """-> feats (batch, n_mels, frames) zero-padded, feats_lengths (batch,),
    text_ids (batch, max_len) padded with -1, text_lengths (batch,); with the adversary on,
    speakers (batch,), -1 for a speaker it does not know."""
    batch = {
        "feats": pad_sequence([r["feats"].t() for r in rows], batch_first=True).transpose(1, 2),
        "feats_lengths": torch.tensor([r["feats"].shape[1] for r in rows], dtype=torch.long),
        "text_ids": pad_sequence([r["text_ids"] for r in rows], batch_first=True, padding_value=-1),
        "text_lengths": torch.tensor([len(r["text_ids"]) for r in rows], dtype=torch.long),
    }
    if "speaker" in rows[0]:
        batch["speakers"] = torch.tensor([r["speaker"] for r in rows], dtype=torch.long)
    return batch


TASK = Task(
    name="tokenizer",
    config_cls=TokenizerConfig,
    build=build,
    processors=processors,
    collate=collate,
    num_frames=lambda row: int(row["feats"].shape[1]),
    training_only=(TRAINING_ONLY,),
)
