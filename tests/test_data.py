"""Kaldi data dirs (read, write, validate) and Parquet shards."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from safetensors.numpy import save_file

from cosy.audio import load_audio, save_audio
from cosy.cli import main
from cosy.data.kaldi import DataDir, validate
from cosy.data.shards import SCHEMA, read_list, read_shard, write_shards
from cosy.errors import CosyError

RATE = 16000


def make_dir(root: Path, n_utts: int = 5) -> DataDir:
    """A good data dir of `n_utts` short tones over two speakers (relative wav paths)."""
    wav, text, utt2spk, utt2lang = {}, {}, {}, {}
    for i in range(n_utts):
        utt = f"s{i % 2}-u{i:02d}"
        t = np.arange(int(RATE * (0.2 + 0.1 * i))) / RATE
        save_audio(root / "wavs" / f"{utt}.wav", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), RATE)
        wav[utt], text[utt], utt2spk[utt], utt2lang[utt] = f"wavs/{utt}.wav", f"sentence number {i}", f"s{i % 2}", "en"
    data = DataDir(wav, text, utt2spk, utt2lang=utt2lang)
    data.save(root)
    return data


def test_save_load_round_trip_sorted_and_spk2utt_derived(tmp_path):
    make_dir(tmp_path)
    loaded = DataDir.load(tmp_path)
    assert loaded.utts == ["s0-u00", "s0-u02", "s0-u04", "s1-u01", "s1-u03"]
    assert loaded.wav["s1-u03"] == str(tmp_path / "wavs" / "s1-u03.wav")  # relative paths resolved
    assert loaded.text["s0-u02"] == "sentence number 2"
    assert loaded.spk2utt == {"s0": ["s0-u00", "s0-u02", "s0-u04"], "s1": ["s1-u01", "s1-u03"]}
    assert (tmp_path / "spk2utt").read_text() == "s0 s0-u00 s0-u02 s0-u04\ns1 s1-u01 s1-u03\n"
    keys = [line.split()[0] for line in (tmp_path / "text").read_text().splitlines()]
    assert keys == sorted(keys)
    assert loaded.utt2dur is None and loaded.utt2lang["s0-u00"] == "en"


def test_subset_keeps_a_share_of_every_speaker_and_is_seeded(tmp_path, capsys):
    make_dir(tmp_path / "full", n_utts=12)  # 6 utterances per speaker
    full = DataDir.load(tmp_path / "full")
    half = full.sample(0.5, seed=3)
    assert {s: len(u) for s, u in half.spk2utt.items()} == {"s0": 3, "s1": 3}
    assert set(half.utts) <= set(full.utts)
    assert half.text == {u: full.text[u] for u in half.utts}
    assert full.sample(0.5, seed=3).utts == half.utts
    assert {tuple(full.sample(0.5, seed=s).utts) for s in range(5)} != {tuple(half.utts)}
    assert len(full.sample(0.01).spk2utt) == 2  # every speaker keeps at least one utterance
    with pytest.raises(CosyError, match="--fraction"):
        full.sample(1.5)
    assert main(["data", "subset", str(tmp_path / "full"), str(tmp_path / "part"), "--fraction", "0.5",
                 "--seed", "3"]) == 0
    assert "wrote 6 of 12 utterances (2 speakers)" in capsys.readouterr().out
    assert validate(tmp_path / "part") == []  # its wav.scp points at the full dir's audio
    assert DataDir.load(tmp_path / "part").utts == half.utts


def test_validate_good_dir_prints_summary_and_exits_zero(tmp_path, capsys):
    make_dir(tmp_path)
    assert validate(tmp_path) == []
    assert main(["data", "validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    seconds = sum(0.2 + 0.1 * i for i in range(5))
    assert f"5 utterances, 2 speakers, {seconds / 3600:.3f} hours" in out


def plant_problems(root: Path) -> dict[tuple[str, int], str]:
    """Break a good dir in every way validate knows; returns {(file, line): message part}."""
    make_dir(root)
    (root / "wavs" / "s1-u01.wav").unlink()
    (root / "wavs" / "s0-u02.wav").write_bytes(b"RIFF this is not audio")
    wav_lines = (root / "wav.scp").read_text().splitlines()
    wav_lines.append("s2-u05 wavs/s0-u00.wav")  # in wav.scp only
    (root / "wav.scp").write_text("\n".join(wav_lines) + "\n")
    text = (root / "text").read_bytes().splitlines()
    text[1] = b"s0-u02"                          # empty transcript
    text[3] = b"s1-u01 caf\xe9 latin-1"          # not UTF-8
    text.append(b"s1-u03 said twice")            # duplicate id
    (root / "text").write_bytes(b"\n".join(text) + b"\n")
    spk = (root / "utt2spk").read_text().splitlines()
    spk[2] = "s0-u04"                            # malformed: no speaker
    spk.append("zz-u99 s9")                      # not in wav.scp
    (root / "utt2spk").write_text("\n".join(spk) + "\n")
    return {
        ("wav.scp", 2): "cannot read audio",
        ("wav.scp", 4): "audio file not found",
        ("wav.scp", 6): "has no entry in text",
        ("text", 2): "empty transcript",
        ("text", 4): "not valid UTF-8",
        ("text", 6): "duplicate id 's1-u03' (first on line 5)",
        ("utt2spk", 3): "malformed line",
        ("utt2spk", 6): "has no entry in wav.scp",
        ("spk2utt", 1): "is listed under 's0' but utt2spk says",
    }


def test_validate_reports_every_planted_problem_by_file_and_line(tmp_path, capsys):
    planted = plant_problems(tmp_path)
    problems = validate(tmp_path)
    found = [(Path(p.file).name, p.line, p.message) for p in problems]
    for (name, line), part in planted.items():
        assert any((n, i) == (name, line) and part in m for n, i, m in found), f"{name}:{line}: '{part}' not reported"
    # 's1-u01' lost its text line to the UTF-8 error, and s2-u05 has no speaker.
    assert any("'s1-u01' has no entry in text" in p.message for p in problems)
    assert any("'s2-u05' has no entry in utt2spk" in p.message for p in problems)

    assert main(["data", "validate", str(tmp_path)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(problems)
    assert f"{tmp_path / 'text'}:4: not valid UTF-8 (byte 10)" in printed


def test_validate_missing_required_file_and_dir(tmp_path):
    make_dir(tmp_path)
    (tmp_path / "utt2spk").unlink()
    (tmp_path / "spk2utt").unlink()
    problems = validate(tmp_path)
    assert [(Path(p.file).name, p.line, p.message) for p in problems] == [("utt2spk", 0, "required file is missing")]
    with pytest.raises(CosyError, match="data dir not found"):
        validate(tmp_path / "nope")
    assert main(["data", "validate", str(tmp_path / "nope")]) == 1


def test_load_refuses_broken_dir_naming_the_file(tmp_path):
    plant_problems(tmp_path)
    with pytest.raises(CosyError, match=r"text:2: utterance 's0-u02' has an empty transcript"):
        DataDir.load(tmp_path)


def test_unsorted_ids_and_bad_durations_are_reported(tmp_path):
    make_dir(tmp_path, n_utts=2)
    (tmp_path / "utt2dur").write_text("s0-u00 0.2\n\ns1-u01 -1\n")
    (tmp_path / "text").write_text("s1-u01 b\ns0-u00 a\n")
    found = {(Path(p.file).name, p.line): p.message for p in validate(tmp_path)}
    assert "not sorted" in found[("text", 2)]
    assert found[("utt2dur", 2)] == "empty line"
    assert "positive number" in found[("utt2dur", 3)]
    assert len(found) == 3


def add_features(root: Path, data: DataDir, skip: str) -> tuple[dict, dict, dict]:
    """Tokens and embeddings for every utterance but `skip`; returns what was stored."""
    rng = np.random.default_rng(0)
    tokens = {u: rng.integers(0, 4096, size=3 + i).astype(np.int32) for i, u in enumerate(data.utts) if u != skip}
    embs = {u: rng.standard_normal(4).astype(np.float32) for u in data.utts if u != skip}
    spk = {s: rng.standard_normal(4).astype(np.float32) for s in data.spk2utt}
    save_file(tokens, str(root / "utt2speech_token.safetensors"))
    save_file(embs, str(root / "utt2embedding.safetensors"))
    save_file(spk, str(root / "spk2embedding.safetensors"))
    return tokens, embs, spk


@pytest.mark.parametrize("num_workers", [1, 2])
def test_shards_round_trip_with_features_and_corrupt_audio(tmp_path, caplog, num_workers):
    root = tmp_path / "data"
    data = make_dir(root, n_utts=5)
    tokens, embs, spk_embs = add_features(root, data, skip="s0-u04")
    (root / "wavs" / "s1-u03.wav").write_bytes(b"RIFF\x00\x00garbage")
    with caplog.at_level(logging.WARNING):
        result = write_shards(root, tmp_path / "shards", utts_per_shard=2, num_workers=num_workers, seed=None)
    assert "s1-u03" in caplog.text and "s1-u03.wav" in caplog.text
    assert [(s.utt, Path(s.path).name) for s in result.skipped] == [("s1-u03", "s1-u03.wav")]
    assert result.rows == 4

    shards = read_list(tmp_path / "shards" / "data.list")
    # The third shard would only hold the corrupt file, so it is not written.
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert all(p.is_absolute() for p in shards)
    assert pq.read_schema(shards[0]).remove_metadata().equals(SCHEMA)
    rows = [row for shard in shards for row in read_shard(shard)]
    assert [r["utt"] for r in rows] == ["s0-u00", "s0-u02", "s0-u04", "s1-u01"]
    for row in rows:
        utt = row["utt"]
        assert set(row) == set(SCHEMA.names)
        assert (row["spk"], row["text"], row["lang"]) == (data.utt2spk[utt], data.text[utt], "en")
        assert row["audio"] == (root / data.wav[utt]).read_bytes()
        samples, rate = load_audio(row["audio"])
        assert row["duration"] == pytest.approx(len(samples) / rate, abs=1e-9)
        assert row["spk_embedding"] == spk_embs[data.utt2spk[utt]].tolist()  # float32 stored exactly
        if utt == "s0-u04":
            assert row["speech_token"] is None and row["embedding"] is None
        else:
            assert row["speech_token"] == tokens[utt].tolist()
            assert row["embedding"] == embs[utt].tolist()
    # a float file that reads but holds a NaN is skipped too: it would poison every batch it joins
    samples, rate = sf.read(root / data.wav["s0-u02"], dtype="float32")
    samples[10] = np.nan
    sf.write(root / "wavs" / "s0-u02.wav", samples, rate, subtype="FLOAT")
    again = write_shards(root, tmp_path / "shards2", utts_per_shard=2, num_workers=num_workers, seed=None)
    assert [s.utt for s in again.skipped] == ["s0-u02", "s1-u03"] and again.rows == 3
    assert "NaN or infinite samples" in again.skipped[0].reason


def test_shards_without_features_are_null_and_cli_summarises(tmp_path, capsys):
    make_dir(tmp_path / "data", n_utts=3)
    assert main(["data", "shards", str(tmp_path / "data"), str(tmp_path / "out")]) == 0
    assert "wrote 3 utterances in 1 shard(s)" in capsys.readouterr().out
    rows = list(read_shard(read_list(tmp_path / "out" / "data.list")[0]))
    assert len(rows) == 3
    assert all(r["speech_token"] is None and r["embedding"] is None and r["spk_embedding"] is None for r in rows)


def test_shards_mix_speakers_in_a_seeded_order(tmp_path, capsys):
    make_dir(tmp_path / "data", n_utts=12)

    def speakers_per_shard(out, *flags):
        assert main(["data", "shards", str(tmp_path / "data"), str(tmp_path / out), "--utts-per-shard", "6", *flags]) == 0
        rows = [list(read_shard(p)) for p in read_list(tmp_path / out / "data.list")]
        assert sorted(r["utt"] for shard in rows for r in shard) == DataDir.load(tmp_path / "data").utts
        return [sorted({r["spk"] for r in shard}) for shard in rows], [[r["utt"] for r in shard] for shard in rows]

    # in the dir's order each shard holds one of the two speakers; shuffled, both
    assert speakers_per_shard("plain", "--no-shuffle")[0] == [["s0"], ["s1"]]
    mixed, order = speakers_per_shard("a")
    assert mixed == [["s0", "s1"], ["s0", "s1"]]
    assert speakers_per_shard("b")[1] == order  # the same seed, the same shards
    assert speakers_per_shard("c", "--seed", "1")[1] != order


def test_shards_bad_arguments_and_bad_shard(tmp_path):
    make_dir(tmp_path / "data", n_utts=1)
    with pytest.raises(CosyError, match="--utts-per-shard"):
        write_shards(tmp_path / "data", tmp_path / "out", utts_per_shard=0)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(CosyError, match="bad.parquet"):
        list(read_shard(tmp_path / "bad.parquet"))
