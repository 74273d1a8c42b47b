"""The recipes: the tiny mini recipe end to end, stage resumption, LibriTTS data prep on a
fake LibriTTS tree, the commands the recipes added (zero-shot lists, BPE training) and
the consistency of the recipe configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from cosy.cli import main as cosy_main
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "recipes/mini/run.sh"
LIBRITTS = ROOT / "recipes/libritts/run.sh"


def run_script(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The whole tiny mini recipe (stages 0-10) run once into a temporary folder."""
    out = tmp_path_factory.mktemp("mini_tiny")
    result = run_script(MINI, "--size", "tiny", "--dir", out, "--nj", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_tiny_recipe_end_to_end(tiny_run):
    test = DataDir.load(tiny_run / "corpus/test")
    model_dir = tiny_run / "model"
    assert model_dir.is_dir() and any(model_dir.iterdir())
    for utt in test.utts:
        wav = tiny_run / "synth" / f"{utt}.wav"
        assert wav.is_file(), f"no synthesis for test utterance {utt}"
        assert sf.info(str(wav)).frames > 0
    prompts = dict(line.split() for line in (tiny_run / "synth/utt2prompt").read_text().splitlines())
    assert set(prompts) == set(test.utts)
    assert all(test.utt2spk[u] == test.utt2spk[p] and u != p for u, p in prompts.items())
    for report in ("eval/tts.json", "eval/tokenizer.json", "eval/speaker.json", "results.md"):
        assert (tiny_run / report).is_file(), report
    stages = [line.split("\t")[0] for line in (tiny_run / "stage_times.tsv").read_text().splitlines()]
    assert stages == [str(n) for n in range(11)]
    # stage 5 trained its models side by side (the CPU default), each into its own log
    for model in ("llm", "flow", "vocoder"):
        assert "step" in (tiny_run / "exp" / f"{model}.log").read_text(), model
        assert not (tiny_run / "exp" / f"{model}.status").exists(), "stage 5 leaves no status files"


def test_tiny_recipe_ships_a_half_precision_model_evaluated_on_the_example_voices(tiny_run):
    from safetensors.torch import load_file
    shipped = tiny_run / "model_half"
    assert load_file(shipped / "flow" / "model.safetensors")["embedding.weight"].dtype == torch.float16
    report = json.loads((shipped / "eval.json").read_text())
    voices = DataDir.load(Path(__file__).resolve().parents[1] / "examples" / "voices")
    assert report["num_utts"] == len(voices.utts)
    assert set(report["synthesised"]["hypotheses"]) == set(voices.utts)


def test_stage_4_alone_rewrites_shards_from_earlier_outputs(tiny_run):
    data_list = tiny_run / "shards/full/train/data.list"
    before = data_list.stat().st_mtime_ns
    result = run_script(MINI, "--size", "tiny", "--dir", tiny_run, "--stage", "4", "--stop_stage", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert data_list.stat().st_mtime_ns > before
    shard = tiny_run / "shards/full/train" / data_list.read_text().split()[0]
    table = pq.read_table(shard)
    train = DataDir.load(tiny_run / "corpus/train")
    assert sorted(table.column("utt").to_pylist()) == train.utts
    assert None not in table.column("speech_token").to_pylist()
    assert None not in table.column("embedding").to_pylist()
    assert (tiny_run / "stage_times.tsv").read_text().splitlines()[-1].startswith("4\t")


def test_stage_5_in_a_row_resumes_finished_trainings(tiny_run):
    times = tiny_run / "stage_times.tsv"
    result = run_script(MINI, "--size", "tiny", "--dir", tiny_run, "--stage", "5", "--stop_stage", "5",
                        "--parallel_train", "false")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "in the background" not in result.stderr
    assert times.read_text().splitlines()[-1].startswith("5\t")


def test_stage_5_names_the_training_that_failed(tiny_run, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(MINI.parent / "conf", conf)
    (conf / "flow_tiny.yaml").write_text("task: flow\nmodel: {no_such_key: 1}\n")
    result = run_script(MINI, "--size", "tiny", "--dir", tiny_run, "--conf", conf, "--stage", "5", "--stop_stage", "5")
    assert result.returncode != 0
    assert "training flow failed" in result.stderr and "no_such_key" in result.stderr
    assert "training llm failed" not in result.stderr and "training vocoder failed" not in result.stderr


def test_recipe_options_are_checked(tmp_path):
    bad = run_script(MINI, "--dir", tmp_path, "--bogus", "1")
    assert bad.returncode != 0 and "--bogus" in bad.stderr
    bad = run_script(MINI, "--dir", tmp_path, "--size", "huge")
    assert bad.returncode != 0 and "--size" in bad.stderr
    (tmp_path / "conf").mkdir()
    wide = run_script(MINI, "--dir", tmp_path, "--size", "wide", "--conf", tmp_path / "conf", "--stage", "5",
                      "--stop_stage", "5", "--parallel_train", "false")
    assert wide.returncode != 0 and "llm_default.yaml" in wide.stderr  # wide trains with default's configs
    bad = run_script(MINI, "--dir", tmp_path, "--parallel_train", "yes")
    assert bad.returncode != 0 and "--parallel_train" in bad.stderr
    for warp in ("-1", "20", "0.1"):
        bad = run_script(MINI, "--dir", tmp_path, "--prompt_warp", warp)
        assert bad.returncode != 0 and "--prompt_warp must be 0 (off) or 0.2 to 12 semitones" in bad.stderr
    for steps in ("-1", "2.5", "x"):
        bad = run_script(MINI, "--dir", tmp_path, "--vocoder_adapt", steps)
        assert bad.returncode != 0 and "--vocoder_adapt must be a number of steps (0: off)" in bad.stderr
    bad = run_script(MINI, "--dir", tmp_path, "--parallel_train", "true", "--ngpu", "1")
    assert bad.returncode != 0 and "--ngpu" in bad.stderr
    bad = run_script(MINI, "--dir", tmp_path, "--data", tmp_path, "--stage", "0")
    assert bad.returncode != 0 and "--stage 1" in bad.stderr
    bad = run_script(LIBRITTS, "--dir", tmp_path, "--stage")
    assert bad.returncode != 0 and "needs a value" in bad.stderr


def write_wav(path: Path, seconds: float, rate: int = 24000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t), rate, subtype="PCM_16")


def fake_libritts(root: Path) -> None:
    """A LibriTTS tree: SUBSET/SPEAKER/CHAPTER/<utt>.wav + <utt>.normalized.txt."""
    layout = {"train-clean-100": [("19", "198"), ("19", "227"), ("26", "495")],
              "dev-clean": [("84", "121123")], "test-clean": [("1089", "134686"), ("121", "121726")]}
    for subset, chapters in layout.items():
        for spk, chapter in chapters:
            for n in range(2):
                utt = f"{spk}_{chapter}_00000{n}_000000"
                wav = root / "LibriTTS" / subset / spk / chapter / f"{utt}.wav"
                write_wav(wav, 0.5 + n)
                wav.with_suffix(".normalized.txt").write_text(f"Chapter {chapter}, sentence {n}.\n")
                wav.with_suffix(".original.txt").write_text(f"chapter {chapter} sentence {n}")


def test_libritts_data_prep_stage(tmp_path):
    fake_libritts(tmp_path)
    chapter = tmp_path / "LibriTTS/train-clean-100/26/495"
    (chapter / "26_495_000000_000000.normalized.txt").unlink()  # a wav without its transcript
    (chapter / "26_495_000001_000000.wav").write_bytes(b"not audio")  # a corrupt wav
    result = run_script(LIBRITTS, "--stage", "0", "--stop_stage", "0", "--db", tmp_path, "--dir", tmp_path / "exp",
                        "--train_sets", "train-clean-100", "--dev_sets", "dev-clean", "--test_sets", "test-clean")
    assert result.returncode == 0, result.stderr
    assert "left out 26_495_000000_000000" in result.stderr and "left out 26_495_000001_000000" in result.stderr
    train = DataDir.load(tmp_path / "exp/data/train")
    assert train.utts == ["19_198_000000_000000", "19_198_000001_000000", "19_227_000000_000000",
                          "19_227_000001_000000"]
    assert set(train.utt2spk.values()) == {"19"}
    assert train.text["19_227_000001_000000"] == "Chapter 227, sentence 1."
    assert train.utt2dur["19_198_000001_000000"] == pytest.approx(1.5, abs=1e-3)
    assert train.utt2lang["19_198_000000_000000"] == "en"
    assert Path(train.wav["19_198_000000_000000"]).is_absolute()
    test = DataDir.load(tmp_path / "exp/data/test")
    assert sorted(test.spk2utt) == ["1089", "121"] and not set(test.spk2utt) & set(train.spk2utt)
    assert len(DataDir.load(tmp_path / "exp/data/dev").utts) == 2


def test_libritts_data_prep_rejects_a_folder_that_is_not_libritts(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "recipes/libritts/local/data_prep.py"), str(tmp_path / "empty"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "is this a LibriTTS subset folder" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "recipes/libritts/local/data_prep.py"), str(tmp_path / "nope"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "not found" in result.stderr


def test_zeroshot_prompts_are_other_utterances_of_the_same_speaker(tmp_path):
    wavs = {}
    for spk, n in (("a", 3), ("b", 2), ("c", 1)):
        for i in range(n):
            wavs[f"{spk}-{i}"] = tmp_path / f"{spk}-{i}.wav"
            write_wav(wavs[f"{spk}-{i}"], 0.2)
    DataDir(wav={u: str(p) for u, p in wavs.items()}, text={u: f"text of {u}" for u in wavs},
            utt2spk={u: u[0] for u in wavs}).save(tmp_path / "test")
    assert cosy_main(["data", "zeroshot", str(tmp_path / "test"), str(tmp_path / "synth")]) == 0
    rows = [line.split("\t") for line in (tmp_path / "synth/manifest.tsv").read_text().splitlines()]
    prompts = dict(line.split() for line in (tmp_path / "synth/utt2prompt").read_text().splitlines())
    assert [r[0] for r in rows] == ["a-0", "a-1", "a-2", "b-0", "b-1"]  # c has no second utterance
    for utt, text, prompt_wav, prompt_text in rows:
        prompt = prompts[utt]
        assert prompt != utt and prompt[0] == utt[0]
        assert text == f"text of {utt}" and prompt_wav == str(wavs[prompt]) and prompt_text == f"text of {prompt}"
    assert sorted(prompts.values()) == ["a-0", "a-1", "a-2", "b-0", "b-1"]  # each used once as a prompt


def test_zeroshot_needs_a_speaker_with_two_utterances(tmp_path):
    write_wav(tmp_path / "x.wav", 0.2)
    DataDir(wav={"x": str(tmp_path / "x.wav")}, text={"x": "hello"}, utt2spk={"x": "s"}).save(tmp_path / "test")
    from cosy.data.zeroshot import write_zeroshot
    with pytest.raises(CosyError, match="no speaker has two utterances"):
        write_zeroshot(tmp_path / "test", tmp_path / "synth")


def test_text_bpe_command_learns_from_transcripts_without_ids(tmp_path, capsys):
    from cosy.text.bpe import TextTokenizer

    data = tmp_path / "train"
    data.mkdir()
    (data / "text").write_text("".join(f"utt{i} the quick brown fox number {i % 7} jumps\n" for i in range(50)))
    out = tmp_path / "tok/tokenizer.json"
    assert cosy_main(["text", "bpe", "--data", str(data), "--vocab-size", "300", "--out", str(out)]) == 0
    tokenizer = TextTokenizer.load(out)
    assert 260 < tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode("the quick brown fox")) == "the quick brown fox"
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    # the transcripts are learnt (frequent words become tokens), their utterance ids are not
    assert any("jumps" in p for p in pieces) and not any("utt" in p for p in pieces)
    assert cosy_main(["text", "bpe", "--data", str(tmp_path / "missing"), "--vocab-size", "300",
                      "--out", str(out)]) == 1
    assert "missing" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text").write_bytes(b"u1 hello\n  u2 leading space\nu3 \xff\xfe bad\n")
    assert cosy_main(["text", "bpe", "--data", str(bad), "--vocab-size", "300", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 bad line(s)" in err and f"{bad / 'text'}:2: line starts with whitespace" in err
    assert f"{bad / 'text'}:3: not valid UTF-8" in err


@pytest.mark.parametrize("conf,size", [("mini", "tiny"), ("mini", "default"), ("libritts", "v1")])
def test_recipe_configs_load_and_agree(conf, size):
    from cosy.train.trainer import load_experiment

    folder = ROOT / "recipes" / conf / "conf"
    models = {}
    for name in ("speaker", "tokenizer", "llm", "flow", "vocoder"):
        experiment, task = load_experiment(folder / f"{name}_{size}.yaml")
        assert task.name == name
        models[name] = experiment.model
    speaker, tokenizer, llm, flow, vocoder = models.values()
    quantizer = tokenizer.quantizer
    codes = quantizer.codebook_size if quantizer.kind == "vq" else int(np.prod(quantizer.levels))
    assert llm.speech_vocab == codes == flow.vocab_size
    embedding = speaker.encoder.embedding_dim
    assert llm.spk_embed_dim == embedding == flow.spk_dim
    rate = tokenizer.mel.sample_rate / tokenizer.mel.hop_length / int(tokenizer.encoder1.input_layer[-1])
    assert rate == flow.token_rate
    assert flow.mel == vocoder.mel
