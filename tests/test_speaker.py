"""Speaker encoder: CAM++ shapes, AAM training, task rows, extraction, ONNX, EER, judge."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file, save_file

from cosy import config as config_io
from cosy.cli import main as cli_main
from cosy.errors import CosyError
from cosy.speaker import CAMPPlus, CAMPPlusConfig, ECAPAConfig, ECAPATDNN, SpeakerConfig, SpeakerModel, build_encoder
from cosy.speaker.evaluate import build_trials, equal_error_rate, min_dcf
from cosy.speaker.features import fbank_features
from cosy.speaker.loss import AAMConfig, AAMSoftmax
from cosy.speaker.onnx import export_onnx, parity
from cosy.speaker.task import TASK, read_speakers
from cosy.train.task import process_row

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000


def tiny_config(**encoder) -> SpeakerConfig:
    data = config_io.load_yaml(ROOT / "recipes/mini/conf/speaker_tiny.yaml")["model"]
    cfg = config_io.from_dict(SpeakerConfig, data)
    return dataclasses.replace(cfg, campplus=dataclasses.replace(cfg.campplus, **encoder))


def tiny_ecapa_config(**sizes) -> SpeakerConfig:
    ecapa = ECAPAConfig(**{"channels": 32, "res2_scale": 4, "se_channels": 8, "aggregate_channels": 48,
                           "attention_channels": 8, "embedding_dim": 24, **sizes})
    return dataclasses.replace(tiny_config(), architecture="ecapa_tdnn", ecapa_tdnn=ecapa)


def synthetic_voice(speaker: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A buzz with a speaker-specific pitch and spectral envelope, plus coloured noise."""
    f0 = (110.0, 170.0, 260.0, 140.0)[speaker] * (1 + 0.03 * rng.standard_normal())
    tilt = (0.6, 0.85, 0.7, 0.95)[speaker]
    peak = (700.0, 1500.0, 2600.0, 1100.0)[speaker]
    t = np.arange(int(seconds * RATE)) / RATE
    wave = np.zeros_like(t)
    for h in range(1, int(4000 / f0)):
        gain = tilt ** h * (1 + 3 * np.exp(-((h * f0 - peak) / 300.0) ** 2))
        wave += gain * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
    wave += 0.05 * rng.standard_normal(len(t))
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def make_data_dir(root: Path, speakers: int = 3, per_speaker: int = 2, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    wav, text, utt2spk = [], [], []
    for s in range(speakers):
        for n in range(per_speaker):
            utt = f"spk{s}-utt{n}"
            sf.write(root / f"{utt}.wav", synthetic_voice(s, 1.0 + 0.3 * n, rng), RATE)
            wav.append(f"{utt} {utt}.wav")
            text.append(f"{utt} hello")
            utt2spk.append(f"{utt} spk{s}")
    if corrupt:
        (root / "spk0-bad.wav").write_bytes(b"RIFF not really a wave file")
        wav.append("spk0-bad spk0-bad.wav")
        text.append("spk0-bad hello")
        utt2spk.append("spk0-bad spk0")
    for name, lines in (("wav.scp", wav), ("text", text), ("utt2spk", utt2spk)):
        (root / name).write_text("\n".join(sorted(lines)) + "\n")
    spk2utt = {}
    for line in sorted(utt2spk):
        utt, spk = line.split()
        spk2utt.setdefault(spk, []).append(utt)
    (root / "spk2utt").write_text("".join(f"{s} {' '.join(u)}\n" for s, u in spk2utt.items()))
    return root


def save_checkpoint(exp: Path, cfg: SpeakerConfig, model: SpeakerModel) -> Path:
    """An experiment dir as the trainer leaves it: config.yaml next to a safetensors state."""
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "config.yaml").write_text(yaml.safe_dump({"task": "speaker", "model": config_io.to_dict(cfg)}))
    save_file(model.state_dict(), str(exp / "model.safetensors"))
    return exp / "model.safetensors"


@pytest.fixture
def speakers_file(tmp_path) -> Path:
    path = tmp_path / "spk2utt"
    path.write_text("spk0 a b\nspk1 c\nspk2 d\n")
    return path


# ----------------------------------------------------------------------------- model


def test_embedding_size_flows_from_config():
    torch.manual_seed(0)
    encoder = CAMPPlus(tiny_config(embedding_dim=37).encoder).eval()
    for frames in (60, 201):  # odd and even lengths, one shorter than a context segment
        assert encoder(torch.randn(2, frames, 80)).shape == (2, 37)


def test_ecapa_embedding_size_flows_from_config():
    torch.manual_seed(0)
    encoder = build_encoder(tiny_ecapa_config(embedding_dim=29)).eval()
    assert isinstance(encoder, ECAPATDNN)
    for frames in (40, 173):
        assert encoder(torch.randn(2, frames, 80)).shape == (2, 29)


def test_block_lists_of_different_lengths_name_the_config_keys():
    with pytest.raises(CosyError, match=r"'model\.campplus\.block_layers'.*got 2, 3 and 3"):
        CAMPPlus(CAMPPlusConfig(block_layers=[12, 24]))
    with pytest.raises(CosyError, match=r"'model\.ecapa_tdnn\.block_kernels'.*got 1 and 3"):
        ECAPATDNN(ECAPAConfig(block_kernels=[3]))


def test_published_sizes_are_the_defaults():
    campplus, ecapa = CAMPPlus(CAMPPlusConfig()), ECAPATDNN(ECAPAConfig())
    assert 6.5e6 < sum(p.numel() for p in campplus.parameters()) < 7.5e6  # CAM++: about 7 M
    assert 14e6 < sum(p.numel() for p in ecapa.parameters()) < 16e6  # ECAPA-TDNN (C=1024): about 15 M
    assert campplus.embed.out_features == CAMPPlusConfig().embedding_dim
    assert ecapa.embed.out_features == ECAPAConfig().embedding_dim
    assert isinstance(build_encoder(SpeakerConfig()), CAMPPlus)


def test_no_hard_coded_embedding_size():
    """192 may appear only as the published default in the config dataclasses."""
    hits = []
    for path in sorted((ROOT / "cosy/speaker").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b192\b", line):
                hits.append((path.name, line.strip()))
    assert hits == [("ecapa.py", "embedding_dim: int = 192"), ("model.py", "embedding_dim: int = 192")]


def test_recipe_configs_map_onto_the_dataclass():
    for name in ("mini/conf/speaker_tiny.yaml", "libritts/conf/speaker_campplus.yaml"):
        data = config_io.load_yaml(ROOT / "recipes" / name)
        assert data["task"] == "speaker"
        cfg = config_io.from_dict(SpeakerConfig, data["model"], "model")
        assert isinstance(cfg.encoder, CAMPPlusConfig) and cfg.loss.scale > 0
    published = config_io.load_yaml(ROOT / "recipes/libritts/conf/speaker_campplus.yaml")["model"]["campplus"]
    assert config_io.from_dict(CAMPPlusConfig, published) == CAMPPlusConfig()


def test_features_match_reference_campplus_input():
    io_ = load_file(str(ROOT / "tests/fixtures/reference/frontend.io.safetensors"))
    ours = fbank_features(io_["in.wav_16000"][0].numpy(), 80)
    # log-energies computed in float32 by two FFT implementations
    assert (ours - io_["out.campplus_input"]).abs().max() < 1e-3


# ----------------------------------------------------------------------------- loss


def test_aam_margin_penalises_only_the_target():
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = AAMSoftmax(AAMConfig(margin=0.0, scale=10.0), 16, 3)
    margin = AAMSoftmax(AAMConfig(margin=0.3, scale=10.0), 16, 3)
    margin.load_state_dict(plain.state_dict())
    cosine = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(plain.weight).T
    expected = torch.nn.functional.cross_entropy(10.0 * cosine, labels)
    out = plain(emb, labels)
    torch.testing.assert_close(out["loss"], expected, atol=1e-5, rtol=0)
    assert out["acc"] == (cosine.argmax(1) == labels).float().mean()
    assert margin(emb, labels)["loss"] > out["loss"] + 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = plain(emb, labels)["loss"]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, atol=1e-5, rtol=0)


def test_margin_warmup_grows_with_training_steps():
    loss = AAMSoftmax(AAMConfig(margin=0.2, margin_warmup_steps=4), 8, 2)
    emb, labels = torch.randn(2, 8), torch.tensor([0, 1])
    seen = []
    for _ in range(6):
        seen.append(loss.current_margin())
        loss(emb, labels)
    assert seen == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    loss.eval()
    loss(emb, labels)  # evaluation does not advance the warm-up
    assert int(loss.step) == 6


def test_aam_loss_decreases_on_three_synthetic_speakers():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for speaker in range(3):
        for _ in range(8):
            feats.append(fbank_features(synthetic_voice(speaker, 0.8, rng), 80))
            labels.append(speaker)
    batch = {"feats": torch.stack(feats), "labels": torch.tensor(labels)}
    cfg = tiny_config()
    model = SpeakerModel(dataclasses.replace(cfg, loss=AAMConfig(margin=0.2, scale=16.0)), num_speakers=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert out["acc"] == 1.0


# ----------------------------------------------------------------------------- task


def test_task_rows_to_batch(speakers_file):
    # 40 mel bins: the front-end follows the network's feat_dim
    cfg = dataclasses.replace(tiny_config(feat_dim=40), speakers=str(speakers_file), segment_seconds=0.5)
    rng = np.random.default_rng(1)
    rows = [{"utt": "u1", "spk": "spk2", "audio": wav_bytes(synthetic_voice(2, 0.3, rng))},
            {"utt": "u2", "spk": "spk0", "audio": wav_bytes(synthetic_voice(0, 1.2, rng))}]
    steps = TASK.processors(cfg, True)
    processed = [process_row(steps, row) for row in rows]
    frames = 1 + (int(0.5 * RATE) - 400) // 160  # 25 ms windows every 10 ms, complete frames only
    assert [TASK.num_frames(r) for r in processed] == [frames, frames]  # short audio is looped
    batch = TASK.collate(processed)
    assert batch["feats"].shape == (2, frames, 40) and batch["labels"].tolist() == [2, 0]
    out = TASK.build(cfg)(batch)
    assert set(out) == {"loss", "acc"} and out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_task_drops_unknown_speakers_and_validates_the_list(speakers_file, tmp_path, caplog):
    cfg = dataclasses.replace(tiny_config(), speakers=str(speakers_file))
    label = TASK.processors(cfg, False)[0]
    with caplog.at_level(logging.WARNING):
        assert label({"utt": "x", "spk": "stranger", "audio": b""}) is None
    assert "stranger" in caplog.text
    assert read_speakers(str(speakers_file)) == {"spk0": 0, "spk1": 1, "spk2": 2}
    with pytest.raises(CosyError, match="model.speakers"):
        read_speakers(str(tmp_path / "missing"))
    (tmp_path / "dup").write_text("a\nb\na\n")
    with pytest.raises(CosyError, match="dup:3"):
        read_speakers(str(tmp_path / "dup"))


# ----------------------------------------------------------------------------- ONNX, extraction


@pytest.mark.parametrize("cfg", [tiny_config(embedding_dim=24), tiny_ecapa_config()], ids=["campplus", "ecapa"])
def test_onnx_export_parity_with_dynamic_length(cfg, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(cfg)
    # Non-trivial normalisation statistics, as a trained model has.
    for module in encoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    export_onnx(encoder, tmp_path / "speaker.onnx")
    assert parity(encoder, tmp_path / "speaker.onnx", frames=(57, 240, 613)) > 0.9999


def test_extract_embeddings_checkpoint_and_onnx(tmp_path, caplog):
    data = make_data_dir(tmp_path / "data")
    cfg = dataclasses.replace(tiny_config(embedding_dim=20), speakers=str(data / "spk2utt"))
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "exp", cfg, SpeakerModel(cfg, num_speakers=3))

    with caplog.at_level(logging.WARNING):
        assert cli_main(["extract", "embeddings", "--data", str(data), "--speaker", str(checkpoint)]) == 0
    assert "spk0-bad" in caplog.text
    utts = load_file(str(data / "utt2embedding.safetensors"))
    spks = load_file(str(data / "spk2embedding.safetensors"))
    assert sorted(utts) == [f"spk{s}-utt{n}" for s in range(3) for n in range(2)]
    assert sorted(spks) == ["spk0", "spk1", "spk2"]
    assert all(v.shape == (20,) and v.dtype == torch.float32 for v in list(utts.values()) + list(spks.values()))
    torch.testing.assert_close(spks["spk1"], (utts["spk1-utt0"] + utts["spk1-utt1"]) / 2, atol=1e-6, rtol=0)

    onnx_path = tmp_path / "speaker.onnx"
    assert cli_main(["export", "speaker", str(checkpoint), "--onnx", str(onnx_path)]) == 0
    assert cli_main(["extract", "embeddings", "--data", str(data), "--speaker", str(onnx_path),
                     "--num-workers", "1"]) == 0
    from_onnx = load_file(str(data / "utt2embedding.safetensors"))
    for utt, vector in utts.items():
        assert torch.nn.functional.cosine_similarity(vector, from_onnx[utt], dim=0) > 0.9999


def test_extract_reports_bad_arguments(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", corrupt=False)
    assert cli_main(["extract", "embeddings", "--data", str(data), "--speaker", str(tmp_path / "nope.onnx")]) == 1
    assert "nope.onnx" in capsys.readouterr().err
    (tmp_path / "exp").mkdir()
    junk = tmp_path / "exp" / "m.safetensors"
    junk.write_bytes(b"junk")
    assert cli_main(["extract", "embeddings", "--data", str(data), "--speaker", str(junk)]) == 1
    assert "config.yaml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluation


def test_eer_and_min_dcf_of_hand_made_scores():
    # Sorted: .9T .8T .7T .6N .5N .4T .3N .2N -> one miss and one false accept at 0.55.
    target, nontarget = [0.9, 0.8, 0.7, 0.4], [0.6, 0.5, 0.3, 0.2]
    assert equal_error_rate(target, nontarget) == pytest.approx(0.25, abs=1e-12)
    # p_target 0.01: cost / 0.01 = miss + 99 false-accept, best at threshold 0.65: 1/4 miss.
    assert min_dcf(target, nontarget) == pytest.approx(0.25, abs=1e-12)
    # Between thresholds 0.75 and 0.65 miss stays 1/3 while false accepts go 0 -> 1/2.
    assert equal_error_rate([0.9, 0.8, 0.4], [0.7, 0.3]) == pytest.approx(1 / 3, abs=1e-12)
    assert equal_error_rate([0.9, 0.8], [0.2, 0.1]) == 0.0
    assert equal_error_rate([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert equal_error_rate([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.5)  # ties are never split


def test_trials_cover_every_pair_once_or_a_sample():
    i, j = build_trials(7, max_trials=1000)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert len(i) == 21 and pairs == {(a, b) for a in range(7) for b in range(a)}
    i, j = build_trials(1000, max_trials=500, seed=3)
    assert len(set(zip(i.tolist(), j.tolist()))) == 500 and (i > j).all() and (i < 1000).all()


def test_eval_speaker_command(tmp_path):
    data = make_data_dir(tmp_path / "data", corrupt=False)
    cfg = dataclasses.replace(tiny_ecapa_config(), speakers=str(data / "spk2utt"))  # the second architecture
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "exp", cfg, SpeakerModel(cfg, num_speakers=3))
    out = tmp_path / "eer.json"
    assert cli_main(["eval", "speaker", "--data", str(data), "--speaker", str(checkpoint), "--no-judge",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["sets"][str(data)]
    assert (result["target_trials"], result["nontarget_trials"]) == (3, 12)
    assert 0.0 <= result["model"]["eer"] <= 1.0
    assert report["pooled"]["model"] == result["model"]


# ----------------------------------------------------------------------------- judge


def espeak(tmp_path: Path, voice: str, text: str) -> np.ndarray:
    path = tmp_path / f"{voice}-{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    samples, rate = sf.read(path, dtype="float32")
    from cosy.audio import resample
    return resample(samples, rate, RATE)


def test_resemblyzer_judge_prefers_the_same_voice(tmp_path):
    from cosy.speaker.judge import ResemblyzerJudge

    judge = ResemblyzerJudge()
    a1 = espeak(tmp_path, "en+m3", "The quick brown fox jumps over the lazy dog near the river bank.")
    a2 = espeak(tmp_path, "en+m3", "Please call Stella and ask her to bring these things from the store.")
    b = espeak(tmp_path, "en+f4", "Please call Stella and ask her to bring these things from the store.")
    assert np.linalg.norm(judge.embed(a1)) == pytest.approx(1.0, abs=1e-4)
    same, different = judge.similarity(a1, a2), judge.similarity(a1, b)
    assert same > different + 0.05, (same, different)


# ----------------------------------------------------------------------------- end to end


def test_train_extract_and_eval_on_the_tiny_corpus(tiny_corpus, tmp_path):
    """Shards -> the training engine -> its checkpoint -> embeddings and EER (model and judge)."""
    for split in ("train", "dev"):
        assert cli_main(["data", "shards", str(tiny_corpus / split), str(tmp_path / split)]) == 0
    cfg = dataclasses.replace(tiny_config(embedding_dim=16), speakers=str(tiny_corpus / "train/spk2utt"),
                              segment_seconds=1.0)
    conf = tmp_path / "speaker.yaml"
    conf.write_text(yaml.safe_dump({
        "task": "speaker", "model": config_io.to_dict(cfg),
        "data": {"batch_type": "static", "batch_size": 8, "sort": False},
        "train": {"max_steps": 4, "max_epochs": 0, "log_every": 2},
    }))
    exp = tmp_path / "exp"
    assert cli_main(["train", "--config", str(conf), "--train-data", str(tmp_path / "train/data.list"),
                     "--cv-data", str(tmp_path / "dev/data.list"), "--out", str(exp)]) == 0
    checkpoint = exp / "step_4.safetensors"

    test_dir = tmp_path / "test"  # a copy: the shared corpus stays read-only
    test_dir.mkdir()
    for name in ("wav.scp", "text", "utt2spk", "spk2utt"):
        (test_dir / name).write_text((tiny_corpus / "test" / name).read_text())
    assert cli_main(["extract", "embeddings", "--data", str(test_dir), "--speaker", str(checkpoint)]) == 0
    utts = load_file(str(test_dir / "utt2embedding.safetensors"))
    expected = sorted(line.split()[0] for line in (test_dir / "wav.scp").read_text().splitlines())
    assert sorted(utts) == expected and all(v.shape == (16,) for v in utts.values())

    out = tmp_path / "eer.json"
    assert cli_main(["eval", "speaker", "--data", str(tiny_corpus / "dev"), "--data", str(test_dir),
                     "--speaker", str(checkpoint), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["judge"] == "resemblyzer"
    assert "model" not in report["sets"][str(tiny_corpus / "dev")]  # one utterance per speaker
    for who in ("model", "judge"):
        assert 0.0 <= report["sets"][str(test_dir)][who]["eer"] <= 1.0
        assert 0.0 <= report["pooled"][who]["eer"] <= 1.0
