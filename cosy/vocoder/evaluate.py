"""`cosy eval vocoder`: copy-synthesis of a data dir, scored against the original audio.

Each utterance is analysed into the vocoder's mel, vocoded back, and compared:
* log-mel L1: mean absolute difference of the two log-mel spectrograms (natural log);
* MCD (dB): mel-cepstral distortion over cepstral coefficients 1..24, the cepstra being
  the orthonormal DCT-II of the log-mel frames (a mel-cepstrum from the vocoder's own
  filterbank, not an SPTK mel-generalised cepstrum), frames aligned one to one:
  10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2), averaged over frames;
* pitch, from the f0 of both sides (cosy.vocoder.f0) on the frames voiced in both: gross
  pitch error (share of those frames whose f0 is off by more than 20%) and f0 RMSE in
  cents. A vocoder can match the mel well and still impose its own pitch (a buzz at the
  frame rate does exactly that), which moves every voice towards one;
* with `--asr`, the word error rate of the independent recogniser (cosy.eval.asr) on the
  vocoded audio against the data dir's `text`, next to its WER on the original audio;
* with `--speaker`, whether the voice survives: resemblyzer similarity of each vocoded
  utterance to its original, and speaker identification (closest speaker centroid of the
  other original recordings) of the vocoded and of the original audio. A vocoder can
  score a fair mel L1 and still lose the speaker, which a zero-shot system cannot afford.

`--griffin-lim` scores Griffin-Lim inversion of the same mel instead of the trained
generator: a reference line for what the mel itself keeps (phase is lost, the voice not).
A HiFT generator's f0 predictor is scored against the recording's f0 (gross error and RMSE,
"f0_predictor_*"), and `--recording-f0` drives its source with that f0 instead: together
they tell whether a lost voice is lost by the predictor's pitch or by the generator. The
summary also holds the copy-synthesis and speaker scores by speaker (and which speaker each
speaker's copies resemble on average), where one lost voice is not averaged away.
`--adapt-steps N` fits the vocoder to each speaker's first readable recording first
(`cosy.vocoder.adapt`, as `synthesis.vocoder_adapt_steps` does to a prompt) and scores
that speaker's other recordings with the fitted copy; the fitting recordings are not
scored ("fitted_on" in the summary names them). The f0 predictor is scored against the f0
searched in the vocoder's training range; the output's pitch errors search 60-600 Hz on
both sides.
Unreadable audio is reported with its utterance id and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.fft
import torch

from cosy.audio import MelConfig, load_audio, mel_spectrogram, save_audio
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.eval.speaker import embed_or_none, identified_utterances, nearest_speakers_of_means, speaker_embedders
from cosy.vocoder.adapt import LEARNING_RATE, fit_to_recording
from cosy.vocoder.f0 import estimate_f0
from cosy.vocoder.hifigan import Generator
from cosy.vocoder.loading import load_generator

log = logging.getLogger(__name__)
CEPSTRA = 24


def f0_errors(reference: np.ndarray, other: np.ndarray, prefix: str = "f0") -> dict[str, float]:
    """Gross pitch error (share off by more than 20%) and RMSE in cents of the f0 track `other`
    against `reference` (Hz per frame, same length, 0 where unvoiced), over the frames voiced
    in both; {} when there are none."""
    both = (reference > 0) & (other > 0)
    if not both.any():
        return {}
    ratio = other[both] / reference[both]
    return {f"{prefix}_gpe": float(np.mean(np.abs(ratio - 1) > 0.2)),
            f"{prefix}_rmse_cents": float(np.sqrt(np.mean((1200 * np.log2(ratio)) ** 2)))}


def pitch_errors(original: np.ndarray, vocoded: np.ndarray, rate: int, hop: int) -> dict[str, float]:
    """`f0_errors` of `vocoded` against `original` (same rate and length)."""
    frames = len(original) // hop
    return f0_errors(estimate_f0(original, rate, hop, frames), estimate_f0(vocoded[:len(original)], rate, hop, frames))


def mel_cepstral_distortion(log_mel_a: torch.Tensor, log_mel_b: torch.Tensor, order: int = CEPSTRA) -> float:
    """MCD in dB between two aligned log-mel spectrograms `(n_mels, frames)`."""
    ca = scipy.fft.dct(log_mel_a.numpy(), type=2, norm="ortho", axis=0)[1:order + 1]
    cb = scipy.fft.dct(log_mel_b.numpy(), type=2, norm="ortho", axis=0)[1:order + 1]
    per_frame = np.sqrt(2 * ((ca - cb) ** 2).sum(axis=0))
    return float(10 / math.log(10) * per_frame.mean())


class GriffinLim(torch.nn.Module):
    """Mel `(batch, n_mels, frames)` -> `(batch, frames * hop)` by Griffin-Lim (librosa), with
    the generator's interface: a reference vocoder that needs no training."""

    def __init__(self, mel: MelConfig, iterations: int = 32):
        super().__init__()
        self.mel, self.iterations = mel, iterations

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, None]:
        import librosa

        cfg, samples = self.mel, mel.shape[-1] * self.mel.hop_length
        waves = []
        for item in torch.exp(mel).numpy():
            wave = librosa.feature.inverse.mel_to_audio(
                item, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                power=1.0, fmin=cfg.fmin, fmax=cfg.fmax, n_iter=self.iterations)
            waves.append(np.pad(wave, (0, max(0, samples - len(wave))))[:samples])
        return torch.from_numpy(np.stack(waves)).float(), None


@torch.no_grad()
def copy_synthesis(generator: Generator | GriffinLim, wave: np.ndarray, f0_range: tuple[float, float] = (60.0, 600.0),
                   recording_f0: bool = False) -> tuple[np.ndarray, dict[str, float]]:
    """Vocode the mel of `wave` (at the vocoder's rate); -> (vocoded audio, scores).

    A HiFT generator's f0 predictor is also scored on its own ("f0_predictor_*"), against the
    f0 of `wave` searched in `f0_range` (its training targets). With `recording_f0` that
    f0, not the predictor's, drives the sine source: what the generator loses by itself.
    """
    mel_cfg = generator.mel
    audio = torch.from_numpy(wave)[None]
    mel = mel_spectrogram(audio, mel_cfg)
    scores = {}
    if getattr(generator, "source", None) is None:
        if recording_f0:
            raise CosyError("driving the source with the recording's f0 needs a HiFT generator (one with an f0 predictor)")
        vocoded, _ = generator(mel)
    else:
        target = torch.from_numpy(estimate_f0(wave, mel_cfg.sample_rate, mel_cfg.hop_length, mel.shape[-1], *f0_range))
        predicted = generator.predict_f0(mel)[0]
        voiced = predicted > generator.source.cfg.voiced_threshold
        scores.update(f0_errors(target.numpy(), torch.where(voiced, predicted, 0.0).numpy(), "f0_predictor"))
        f0 = target if recording_f0 else predicted
        vocoded = generator.decode(mel, generator.make_source(f0[None]))
    again = mel_spectrogram(vocoded, mel_cfg)
    scores.update({"log_mel_l1": float((mel - again).abs().mean()),
                   "mcd_db": mel_cepstral_distortion(mel[0], again[0]),
                   **pitch_errors(wave, vocoded[0].numpy(), mel_cfg.sample_rate, mel_cfg.hop_length)})
    return vocoded[0].numpy(), scores


def evaluate(data: DataDir, generator: Generator | GriffinLim, recogniser=None, limit: int = 0,
             save_dir: Path | None = None, embedders: dict | None = None,
             f0_range: tuple[float, float] = (60.0, 600.0), recording_f0: bool = False,
             fit: Callable[[np.ndarray], Generator] | None = None) -> dict:
    """Scores per utterance, their means, and under "per_speaker" each speaker's means;
    `recogniser` (cosy.eval.asr.Recogniser) adds WER, `embedders` (name -> (samples, rate) ->
    unit vector, see cosy.eval.speaker) speaker scores. `f0_range` and `recording_f0` go to
    `copy_synthesis`. `fit` (a recording -> a generator fitted to it) is given each
    speaker's first readable recording, which is then not scored; the speaker's other
    recordings are vocoded by what it returns."""
    rate = generator.mel.sample_rate
    min_samples = generator.mel.n_fft
    per_utt, skipped, refs, hyps_vocoded, hyps_original = {}, [], [], [], []
    fitted_on: dict[str, str] = {}        # speaker -> the recording its copy was fitted on
    copies: dict[str, Generator] = {}     # speaker -> that copy, until the speaker's last utterance
    vectors: dict[str, tuple[dict, dict]] = {}  # name -> (original, vocoded) vectors by utt
    utts = data.utts[:limit or None]
    last_of_speaker = {data.utt2spk[utt]: n for n, utt in enumerate(utts)}
    for n, utt in enumerate(utts):
        try:
            wave, _ = load_audio(data.wav[utt], rate)
        except CosyError as err:
            log.warning("utterance %s: %s; skipped", utt, err)
            skipped.append(utt)
            continue
        if len(wave) < min_samples:
            log.warning("utterance %s: shorter than one mel window (%d samples); skipped", utt, min_samples)
            skipped.append(utt)
            continue
        speaker = data.utt2spk[utt]
        if fit is not None and speaker not in fitted_on:
            fitted_on[speaker], copies[speaker] = utt, fit(wave)
            continue
        vocoder = generator if fit is None else copies[speaker]
        if last_of_speaker[speaker] == n:
            copies.pop(speaker, None)  # a copy per speaker held to the end would add up on a big test set
        vocoded, scores = copy_synthesis(vocoder, wave, f0_range, recording_f0)
        per_utt[utt] = scores
        if save_dir is not None:
            save_audio(save_dir / f"{utt}.wav", vocoded, rate)
        for name, embed in (embedders or {}).items():
            original, copied = embed_or_none(embed, wave, rate, utt), embed_or_none(embed, vocoded, rate, utt)
            vectors.setdefault(name, ({}, {}))
            vectors[name][0][utt], vectors[name][1][utt] = original, copied
            # a side the judge found no speech in resembles no one
            scores[f"sim_{name}"] = 0.0 if original is None or copied is None else float(original @ copied)
        if recogniser is not None:
            refs.append(data.text[utt])
            hyps_vocoded.append(recogniser.transcribe(vocoded, rate))
            hyps_original.append(recogniser.transcribe(wave, rate))
    if not per_utt:
        raise CosyError(f"data dir {data.path}: no utterance could be scored")
    source_f0 = "none" if getattr(generator, "source", None) is None else "recording" if recording_f0 else "predicted"
    keys = sorted({key for scores in per_utt.values() for key in scores})
    summary = {"utterances": len(per_utt), "skipped": skipped, "source_f0": source_f0,
               **_means(list(per_utt.values()), keys)}
    if fit is not None:
        summary["fitted_on"] = dict(sorted(fitted_on.items()))
    scored_data = data.subset(sorted(per_utt))
    per_speaker = {spk: {"utterances": len(utts), **_means([per_utt[u] for u in utts], keys)}
                   for spk, utts in sorted(scored_data.spk2utt.items())}
    for name, (original, copied) in vectors.items():
        size = next((v.shape for v in [*original.values(), *copied.values()] if v is not None), (1,))
        original, copied = ({u: np.zeros(size, np.float32) if v is None else v for u, v in table.items()}
                            for table in (original, copied))
        for side, side_vectors in (("original", original), ("vocoded", copied)):
            identified = identified_utterances(scored_data, side_vectors, original, {})
            closest = nearest_speakers_of_means(scored_data, side_vectors, original)
            summary[f"spk_id_{name}_{side}"] = float(np.mean(list(identified.values())))
            for spk, row in per_speaker.items():
                row[f"spk_id_{name}_{side}"] = float(np.mean([identified[u] for u in scored_data.spk2utt[spk]]))
                row[f"closest_{name}_{side}"] = closest[spk]
    if recogniser is not None:
        from cosy.eval.asr import word_error_rate

        summary["asr"] = recogniser.name
        summary["wer_vocoded"] = word_error_rate(refs, hyps_vocoded)
        summary["wer_original"] = word_error_rate(refs, hyps_original)
    summary["per_speaker"] = per_speaker
    return {"summary": summary, "utterances": per_utt}


def _means(rows: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    """key -> mean over the rows that have it; NaN where none has (say, no frame voiced in both
    sides), so that every speaker's row has the same keys."""
    out = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Kaldi-style data dir (wav.scp, text, utt2spk)")
    parser.add_argument("--vocoder", required=True, help="vocoder checkpoint (.safetensors)")
    parser.add_argument("--config", help="experiment config (default: config.yaml beside the checkpoint)")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N utterances (0: all); with --adapt-steps the fitting ones count")
    parser.add_argument("--out", help="write the per-utterance scores as JSON here")
    parser.add_argument("--save-wavs", help="write the vocoded audio into this folder")
    parser.add_argument("--asr", action="store_true", help="also score WER with the independent recogniser")
    parser.add_argument("--whisper-dir", help="with --asr: a local Whisper model dir instead of pocketsphinx")
    parser.add_argument("--griffin-lim", action="store_true",
                        help="invert the checkpoint's mel with Griffin-Lim instead of its generator (a reference)")
    parser.add_argument("--recording-f0", action="store_true",
                        help="drive the HiFT source with the recording's f0 instead of the f0 predictor's "
                             "(what the generator loses by itself; HiFT only, not with --griffin-lim)")
    parser.add_argument("--speaker", action="store_true",
                        help="also score speaker similarity and identification with resemblyzer")
    parser.add_argument("--adapt-steps", type=int, default=0, metavar="N",
                        help="fit the vocoder to each speaker's first recording in N steps and score the speaker's "
                             "other recordings with it (as synthesis.vocoder_adapt_steps does to a prompt)")
    parser.add_argument("--adapt-lr", type=float, default=LEARNING_RATE, help="learning rate of --adapt-steps")


def run(args: argparse.Namespace) -> int:
    if args.griffin_lim and args.recording_f0:
        raise CosyError("--griffin-lim and --recording-f0 exclude each other: Griffin-Lim has no source to drive")
    if args.adapt_steps < 0 or args.adapt_lr <= 0:
        raise CosyError(f"--adapt-steps must be >= 0 and --adapt-lr > 0, got {args.adapt_steps} and {args.adapt_lr}")
    if args.griffin_lim and args.adapt_steps:
        raise CosyError("--griffin-lim and --adapt-steps exclude each other: Griffin-Lim has nothing to train")
    data = DataDir.load(args.data)
    generator, cfg = load_generator(args.vocoder, args.config)
    if args.recording_f0 and generator.source is None:
        raise CosyError(f"--recording-f0 needs a HiFT vocoder (one with an f0 predictor); {args.vocoder} has none")
    if args.griffin_lim:
        generator = GriffinLim(generator.mel)
    recogniser = None
    if args.asr:
        from cosy.eval.asr import load_recogniser

        recogniser = load_recogniser(args.whisper_dir)
    embedders = speaker_embedders(None) if args.speaker else None
    fit = None
    if args.adapt_steps:
        def fit(wave: np.ndarray) -> Generator:
            return fit_to_recording(generator, cfg, wave, args.adapt_steps, args.adapt_lr)
    result = evaluate(data, generator, recogniser, args.limit, Path(args.save_wavs) if args.save_wavs else None,
                      embedders, (cfg.f0_min, cfg.f0_max), args.recording_f0, fit)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0
