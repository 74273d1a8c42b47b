"""Independent speech recognition for intelligibility scores.

The judge must not share anything with the system it scores, so cosy uses
pocketsphinx (its pip package ships an English acoustic and language model and runs
offline) and, when the user gives a local Whisper model directory (Hugging Face
format), that model instead.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Protocol

import numpy as np

from cosy.audio import resample
from cosy.errors import CosyError

ASR_SAMPLE_RATE = 16000


class Recogniser(Protocol):
    name: str

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> str: ...


class PocketSphinx:
    """pocketsphinx with its bundled US-English models."""

    name = "pocketsphinx-en-us"

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise CosyError("the independent ASR needs the pip package pocketsphinx "
                            "(pip install 'cosy[eval]')") from err
        self._decoder_class = Decoder

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> str:
        pcm = np.clip(resample(samples, sample_rate, ASR_SAMPLE_RATE), -1.0, 1.0)
        # A fresh decoder (0.3 s) for each utterance: one decoder carries state from one
        # utterance to the next even with batch CMN (a tenth of the transcripts of a test
        # set changed with the order they were decoded in), and a transcript must not
        # depend on which other wavs a process judged before it.
        # Batch CMN: a whole file is at hand, so each utterance is normalised by its own mean.
        decoder = self._decoder_class(samprate=ASR_SAMPLE_RATE, cmn="batch", loglevel="FATAL")
        decoder.start_utt()
        decoder.process_raw((pcm * 32767).astype(np.int16).tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class LocalWhisper:
    """A Whisper checkpoint in Hugging Face format from a local directory (no download)."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CosyError(f"{model_dir} is not a Whisper model directory (no config.json)")
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.name = recogniser_name(model_dir)
        self._processor = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        self._model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> str:
        import torch

        audio = resample(samples, sample_rate, ASR_SAMPLE_RATE)
        feats = self._processor(audio, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = self._model.generate(feats, language="en", task="transcribe")
        return self._processor.batch_decode(ids, skip_special_tokens=True)[0]


def load_recogniser(whisper_dir: str | Path | None = None) -> Recogniser:
    return LocalWhisper(whisper_dir) if whisper_dir else PocketSphinx()


def recogniser_name(whisper_dir: str | Path | None = None) -> str:
    """The name of the recogniser `load_recogniser(whisper_dir)` gives, without loading it."""
    return f"whisper:{Path(whisper_dir).name}" if whisper_dir else PocketSphinx.name


_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
            "6": "six", "7": "seven", "8": "eight", "9": "nine"}


def normalise_for_wer(text: str) -> str:
    """The text normalisation applied to references and hypotheses before WER.

    Lower case, accents folded to ASCII, apostrophes kept inside words ("don't"),
    every other non-alphanumeric character becomes a space, lone digits are spelled
    out, and whitespace is collapsed.
    """
    text = re.sub("[\u2018\u2019\u02bc]", "'", text)  # typographic apostrophes, which NFKD keeps
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    text = re.sub(r"[^a-z0-9']+", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(words)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (total edits / total reference words) after `normalise_for_wer`."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalise_for_wer(r) for r in references]
    hyps = [normalise_for_wer(h) for h in hypotheses]
    if not any(refs):
        raise ValueError("every reference is empty after normalisation")
    keep = [(r, h) for r, h in zip(refs, hyps) if r]
    return float(jiwer.wer([r for r, _ in keep], [h for _, h in keep]))
