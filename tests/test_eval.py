import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosy.eval.asr import PocketSphinx, normalise_for_wer, word_error_rate

EXAMPLE_VOICE = Path(__file__).resolve().parents[1] / "examples" / "voices" / "wavs" / "spk030-00270.flac"


def test_normalisation_for_wer():
    assert normalise_for_wer("  Don't STOP, it's 2 o'clock!  Café ") == "don't stop it's two o'clock cafe"
    assert normalise_for_wer("'quoted' -- words") == "quoted words"
    assert normalise_for_wer("Don\u2019t stop") == "don't stop"  # a typographic apostrophe is one too


def test_word_error_rate_counts_edits_over_reference_words():
    # one substitution and one deletion over 6 reference words
    assert word_error_rate(["the cat sat", "on the mat"], ["the cat sit", "on mat"]) == pytest.approx(2 / 6)
    assert word_error_rate(["Hello, world!"], ["hello world"]) == 0.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])


def test_pocketsphinx_recognises_clear_synthetic_speech(tmp_path):
    text = "the quick brown fox jumps over the lazy dog near the river bank"
    wav = tmp_path / "fox.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True)
    samples, rate = sf.read(wav, dtype="float32")
    hyp = PocketSphinx().transcribe(samples, rate)
    assert word_error_rate([text], [hyp]) <= 0.25
    # noise is not speech: the judge must not hallucinate the sentence
    noise = np.random.default_rng(0).normal(0, 0.05, rate * 2).astype(np.float32)
    assert word_error_rate([text], [PocketSphinx().transcribe(noise, rate)]) >= 0.75


def test_pocketsphinx_transcript_does_not_depend_on_what_it_judged_before():
    # A pocketsphinx decoder carries state from one utterance to the next: with one decoder
    # shared between utterances, decoding this recording twice gave two different
    # transcripts, so `transcribe` must start afresh each time.
    samples, rate = sf.read(EXAMPLE_VOICE, dtype="float32")
    judge = PocketSphinx()
    first = judge.transcribe(samples, rate)
    assert first
    assert judge.transcribe(samples, rate) == first


def test_dnsmos_prefers_speech_to_noise(tmp_path):
    from cosy.eval.mos import dnsmos

    wav = tmp_path / "speech.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", "a clean sentence of synthetic speech for scoring", "-o", str(wav)],
                   check=True)
    samples, rate = sf.read(wav, dtype="float32")
    speech = dnsmos(samples, rate)
    noise = dnsmos(np.random.default_rng(1).uniform(-0.5, 0.5, rate * 3).astype(np.float32), rate)
    assert set(speech) == {"ovrl", "sig", "bak", "p808"}
    assert speech["ovrl"] > noise["ovrl"] + 0.3
