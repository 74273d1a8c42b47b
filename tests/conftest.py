"""Fixtures shared by cosy's tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The tiny synthetic corpus, built once per test session (seed 0).

    The folder holds train/, dev/ and test/ Kaldi data dirs (wav.scp with absolute
    paths, text, utt2spk, spk2utt, utt2dur; 22050 Hz mono 16-bit WAV), speakers.json
    and report.json. Treat it as read-only: other tests share it.
    """
    from cosy.data.synth_corpus import build_corpus

    out = tmp_path_factory.mktemp("tiny_corpus")
    build_corpus(out, size="tiny", seed=0)
    return out
