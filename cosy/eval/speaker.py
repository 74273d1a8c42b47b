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


def speaker_judge_names(speaker_model: str | None) -> list[str]:
    """The names `speaker_embedders(speaker_model)` gives its judges, without loading them."""
    return ["resemblyzer"] + (["cosy"] if speaker_model else [])


def speaker_embedders(speaker_model: str | None) -> dict[str, Embedder]:
    """name -> function (samples, rate) -> unit speaker vector, for each of `speaker_judge_names`."""
    from cosy.speaker.judge import ResemblyzerJudge

    judge = ResemblyzerJudge()
    embedders: dict[str, Embedder] = {"resemblyzer": judge.embed}
    if speaker_model:
        from cosy.speaker.extract import load_speaker_encoder
        from cosy.speaker.features import SAMPLE_RATE, fbank_features

        encoder = load_speaker_encoder(speaker_model)
        embedders["cosy"] = lambda x, sr: _unit(
            encoder(fbank_features(resample(x, sr, SAMPLE_RATE), encoder.feat_dim)))
    return {name: _finite(name, embed) for name, embed in embedders.items()}


def _finite(name: str, embed: Embedder) -> Embedder:
    """`embed`, raising CosyError where it gives NaN or infinity (audio of a frame or two):
    such a vector would score NaN against every speaker."""
    def checked(samples: np.ndarray, rate: int) -> np.ndarray:
        vector = embed(samples, rate)
        if not np.isfinite(vector).all():
            raise CosyError(f"the {name} judge gave a non-finite vector for {len(samples) / rate:.3f} s of audio")
        return vector
    return checked


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


def _nearest_speaker(vector: np.ndarray, data: DataDir, reference: dict[str, np.ndarray],
                     leave_out: set[str]) -> str:
    """The speaker whose centroid (of the reference vectors of their utterances, without
    `leave_out` unless that leaves none) has the highest cosine with `vector`."""
    scores = {}
    for spk, members in data.spk2utt.items():
        usable = [m for m in members if m in reference]
        kept = [m for m in usable if m not in leave_out] or usable
        if kept:
            scores[spk] = float(vector @ _unit(np.mean([reference[m] for m in kept], axis=0)))
    return max(scores, key=scores.get)


def nearest_speakers(data: DataDir, embeddings: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                     exclude: dict[str, str]) -> dict[str, str | None]:
    """utt -> the speaker whose centroid is nearest the utterance's vector.

    Centroids come from the data dir's recordings (`reference`), leaving out the
    utterance itself and the prompt it was made from, so neither can vote. A speaker with
    no third usable recording keeps them (warned about: such a speaker's identification
    is flattered). A zero vector (a judge found no speech) is nearest nobody (None).
    """
    nearest = {}
    for utt, vector in embeddings.items():
        leave_out = {utt, exclude.get(utt)}
        if not any(m in reference and m not in leave_out for m in data.spk2utt[data.utt2spk[utt]]):
            log.warning("utterance %s: speaker %s has no usable recording besides it and its prompt, so "
                        "those two make the speaker's centroid", utt, data.utt2spk[utt])
        nearest[utt] = _nearest_speaker(vector, data, reference, leave_out) if vector.any() else None
    return nearest


def nearest_speakers_of_means(data: DataDir, embeddings: dict[str, np.ndarray],
                              reference: dict[str, np.ndarray]) -> dict[str, str | None]:
    """speaker -> the speaker their outputs are, on average, most similar to; None where
    no judge found speech in any of their outputs.

    Each vector is a unit vector (or zero: resembles no one, cosine 0), so the mean cosine
    of a speaker's outputs to a unit centroid is the dot product of their mean vector with
    it: this is the nearest speaker of each speaker's mean output vector, against the
    centroids of all recordings.
    """
    by_speaker: dict[str, list[np.ndarray]] = {}
    for utt, vector in embeddings.items():
        by_speaker.setdefault(data.utt2spk[utt], []).append(vector)
    means = {spk: np.mean(vectors, axis=0) for spk, vectors in by_speaker.items()}
    return {spk: _nearest_speaker(mean, data, reference, set()) if mean.any() else None
            for spk, mean in means.items()}


def identified_utterances(data: DataDir, embeddings: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                          exclude: dict[str, str]) -> dict[str, bool]:
    """utt -> whether its vector is closest to its own speaker's centroid (`nearest_speakers`)."""
    return {utt: spk == data.utt2spk[utt] for utt, spk in nearest_speakers(data, embeddings, reference, exclude).items()}
