"""Speaker judges shared by the evaluations: embedders (resemblyzer, and cosy's own speaker
model) and speaker identification against the recordings of a data dir."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from cosy.audio import resample
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError

log = logging.getLogger(__name__)

Embedder = Callable[[np.ndarray, int], np.ndarray]


def speaker_embedders(speaker_model: str | None) -> dict[str, Embedder]:
    """name -> function (samples, rate) -> unit speaker vector."""
    from cosy.speaker.judge import ResemblyzerJudge

    judge = ResemblyzerJudge()
    embedders: dict[str, Embedder] = {"resemblyzer": judge.embed}
    if speaker_model:
        from cosy.speaker.extract import load_speaker_encoder
        from cosy.speaker.features import SAMPLE_RATE, fbank_features

        encoder = load_speaker_encoder(speaker_model)
        embedders["cosy"] = lambda x, sr: _unit(
            encoder(fbank_features(resample(x, sr, SAMPLE_RATE), encoder.feat_dim)))
    return embedders


def embed_or_none(embed: Embedder, samples: np.ndarray, rate: int, utt: str) -> np.ndarray | None:
    """The judge's vector, or None (logged) where it finds no speech: such audio resembles
    no one, and the callers score it as a zero vector."""
    try:
        return embed(samples, rate)
    except CosyError as err:
        log.warning("utterance %s: %s; scored as a zero speaker vector", utt, err)
        return None


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def speaker_identification(data: DataDir, embeddings: dict[str, np.ndarray],
                           reference: dict[str, np.ndarray], exclude: dict[str, str]) -> float:
    """Share of utterances whose vector is closest to their own speaker's centroid.

    Centroids come from the data dir's recordings (`reference`), leaving out the
    utterance itself and the prompt it was made from, so the prompt cannot vote.
    """
    hits = []
    for utt, vector in embeddings.items():
        if not vector.any():  # a judge found no speech in it: it identifies nobody
            hits.append(False)
            continue
        scores = {}
        for spk, members in data.spk2utt.items():
            usable = [m for m in members if m in reference]
            kept = [m for m in usable if m not in (utt, exclude.get(utt))] or usable
            if kept:
                scores[spk] = float(vector @ _unit(np.mean([reference[m] for m in kept], axis=0)))
        hits.append(max(scores, key=scores.get) == data.utt2spk[utt])
    return float(np.mean(hits))
