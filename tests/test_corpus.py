"""The synthetic multi-speaker corpus (tiny size; built once by the tiny_corpus fixture)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf

from cosy.cli import main
from cosy.data.kaldi import DataDir, validate
from cosy.data.synth_corpus import (SAMPLE_RATE, SIZES, TEST_VOICE_MARGIN, Speaker, available_voices, build_corpus,
                                    clean_sentence, collect_sentences, plan_corpus, plan_speakers, render_speaker,
                                    trim_silence)
from cosy.errors import CosyError

SPLITS = ("train", "dev", "test")


def test_tiny_corpus_has_valid_splits(tiny_corpus):
    plan = SIZES["tiny"]
    data = {name: DataDir.load(tiny_corpus / name) for name in SPLITS}
    for name in SPLITS:
        assert validate(tiny_corpus / name) == []
        assert (tiny_corpus / name / "utt2dur").is_file() and (tiny_corpus / name / "spk2utt").is_file()
    train_spk, dev_spk, test_spk = (set(data[n].utt2spk.values()) for n in SPLITS)
    assert len(train_spk) == plan.train_speakers and len(test_spk) == plan.test_speakers
    assert train_spk.isdisjoint(test_spk)
    assert dev_spk <= train_spk
    train_text = set(data["train"].text.values())
    assert train_text.isdisjoint(data["dev"].text.values())
    assert train_text.isdisjoint(data["test"].text.values())
    # Nothing was dropped for the installed voices, so every planned utterance is there.
    assert len(data["train"].wav) == plan.train_speakers * plan.train_utts
    assert len(data["test"].wav) == plan.test_speakers * plan.test_utts


def test_tiny_corpus_audio_and_text(tiny_corpus):
    data = DataDir.load(tiny_corpus / "train")
    for utt in data.utts:
        assert utt.startswith(data.utt2spk[utt] + "-")
        info = sf.info(data.wav[utt])
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        assert data.utt2dur[utt] == pytest.approx(info.frames / SAMPLE_RATE, abs=1e-4)
        samples, _ = sf.read(data.wav[utt], dtype="float32")
        # Already trimmed: trimming again removes at most one 10 ms frame at each end.
        assert len(trim_silence(samples, SAMPLE_RATE)) >= len(samples) - 2 * SAMPLE_RATE // 100
        assert 0.5 < np.abs(samples).max() < 0.95
        assert clean_sentence(data.text[utt]) == data.text[utt]


def test_speakers_json_records_each_recipe(tiny_corpus):
    recipes = json.loads((tiny_corpus / "speakers.json").read_text())
    assert {r["id"] for r in recipes} == {s for n in SPLITS for s in DataDir.load(tiny_corpus / n).utt2spk.values()}
    for recipe in recipes:
        assert set(recipe) == {"id", "engine", "voice", "variant", "pitch", "tempo", "split"}
    assert len({(r["engine"], r["voice"], r["variant"], r["pitch"], r["tempo"]) for r in recipes}) == len(recipes)
    assert len({r["engine"] for r in recipes}) >= 2


def test_same_seed_same_corpus_other_seed_other_corpus(tiny_corpus, tmp_path, capsys):
    # The fixture was built with one job; two jobs must not change a byte.
    assert main(["data", "corpus", "--size", "tiny", "--out", str(tmp_path / "again"), "--seed", "0",
                 "--num-jobs", "2"]) == 0
    assert "train 24 utts / 6 spk" in capsys.readouterr().out
    for name in SPLITS:
        first, second = DataDir.load(tiny_corpus / name), DataDir.load(tmp_path / "again" / name)
        assert first.text == second.text and first.utt2spk == second.utt2spk
        for utt in first.utts:
            with open(first.wav[utt], "rb") as a, open(second.wav[utt], "rb") as b:
                assert a.read() == b.read(), utt
    other = tmp_path / "seed1"
    assert main(["data", "corpus", "--size", "tiny", "--out", str(other), "--seed", "1"]) == 0
    assert DataDir.load(other / "train").text != DataDir.load(tiny_corpus / "train").text


def test_clean_sentence_rules():
    assert clean_sentence('He said  "stop!!!" and left.') == "He said stop! and left."
    assert clean_sentence('"Stop," he said, "right now!!!"') == "Stop, he said, right now!"
    assert clean_sentence("There are 3 cats here.") is None
    assert clean_sentence("Caf\u00e9 au lait is fine.") is None
    assert clean_sentence("Too short here.") is None
    assert clean_sentence(" ".join(["word"] * 30) + ".") is not None
    assert clean_sentence(" ".join(["word"] * 31) + ".") is None
    assert clean_sentence("No final punctuation here at all") is None
    assert clean_sentence("Life is short -- Anonymous said it.") is None
    assert clean_sentence("We MIGHT AS WELL break it.") is None
    assert clean_sentence("Q: What is the time now?") is None
    assert clean_sentence("I think a cat is near.") == "I think a cat is near."


def test_trim_silence_keeps_padding():
    rate = 16000
    tone = 0.5 * np.sin(2 * np.pi * 300 * np.arange(rate // 2) / rate)
    signal = np.concatenate([np.zeros(rate), tone, np.zeros(rate)]).astype(np.float32)
    trimmed = trim_silence(signal, rate)
    assert len(trimmed) / rate == pytest.approx(0.5 + 2 * 0.1, abs=0.011)  # one 10 ms frame
    assert len(trim_silence(np.zeros(rate, dtype=np.float32), rate)) == 0


def test_plan_speakers_spreads_engines_and_separates_clones():
    voices = {"espeak-ng": [("en-us", "m1"), ("en-gb", "f2")], "flite": [("slt", "")], "festival": [("kal_diphone", "")]}
    speakers = plan_speakers(12, 3, voices, random.Random(0))
    assert [s.split for s in speakers] == ["train"] * 9 + ["test"] * 3
    assert len({s.id for s in speakers}) == 12
    counts = {e: sum(s.engine == e for s in speakers) for e in voices}
    assert counts["espeak-ng"] > counts["flite"] > counts["festival"] >= 1
    slt = sorted(s.pitch for s in speakers if s.voice == "slt")
    # Clones of one voice sit a semitone apart or more (0.9 allows for rounding to 0.1).
    assert min(np.diff(slt)) >= 0.9


def test_wide_plan_has_the_default_test_set_and_hours_with_more_voices():
    voices, sentences = available_voices(), collect_sentences()
    default = plan_corpus(SIZES["default"], 0, voices, sentences)
    wide = plan_corpus(SIZES["wide"], 0, voices, sentences)

    def lines(planned, split):
        return {utt: text for _, spk_lines in planned for name, utt, text in spk_lines if name == split}

    assert lines(wide, "test") == lines(default, "test")
    assert lines(wide, "dev").items() >= lines(default, "dev").items()
    longer = plan_speakers(len(default) + 30, 8, voices, random.Random(0))
    assert [(s.id, s.engine, s.voice, s.pitch) for s in longer[:len(default)]] == \
        [(s.id, s.engine, s.voice, s.pitch) for s, _ in default]
    default_train = lines(default, "train")
    for spk, spk_lines in wide[:len(default)]:
        train = {utt: text for name, utt, text in spk_lines if name == "train"}
        assert len(train) == (0 if spk.split == "test" else 150)
        assert train.items() <= default_train.items()
    extra = [spk for spk, _ in wide[len(default):]]
    assert 27 <= len(extra) <= 30 and all(spk.split == "train" for spk in extra)
    assert len({spk.id for spk, _ in wide}) == len(wide)
    tests = [spk for spk, _ in default if spk.split == "test"]
    for spk in extra:
        assert all(abs(spk.pitch - t.pitch) > TEST_VOICE_MARGIN - 0.01 for t in tests
                   if (t.engine, t.voice, t.variant) == (spk.engine, spk.voice, spk.variant))
    train_speakers = sum(spk.split == "train" for spk, _ in wide)
    assert len(lines(wide, "train")) == 150 * train_speakers
    assert 0.95 < len(lines(wide, "train")) / len(default_train) <= 1.0
    assert not set(lines(wide, "train").values()) & set(lines(wide, "test").values())
    with pytest.raises(CosyError, match="--size needs 300 train sentences"):
        plan_corpus(SIZES["default"], 0, voices, sentences[:300])


def test_silent_engine_output_is_dropped_and_reported(tmp_path):
    bad = Speaker("spk999", "espeak-ng", "xx-no-such-voice", "", 0.0, 1.0, "train")
    kept, dropped = render_speaker(bad, [("train", "spk999-00001", "Hello there my friend.")], tmp_path)
    assert kept == [] and dropped == [("spk999-00001", "the engine wrote no audio")]


def test_installed_voices_and_bad_arguments(tmp_path):
    voices = available_voices()
    assert "awb_time" not in {v for v, _ in voices.get("flite", [])}
    with pytest.raises(CosyError, match="--size"):
        build_corpus(tmp_path, size="huge")
    (tmp_path / "keep.txt").write_text("not a corpus")
    assert main(["data", "corpus", "--size", "tiny", "--out", str(tmp_path)]) == 1
