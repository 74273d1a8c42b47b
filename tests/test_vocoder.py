"""Vocoder: batched and streaming synthesis, GAN training, data processors, f0, export, eval."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosy import config
from cosy.audio import MelConfig, mel_spectrogram
from cosy.errors import CosyError
from cosy.train.task import process_row
from cosy.vocoder.discriminators import DiscriminatorConfig
from cosy.vocoder.f0 import estimate_f0
from cosy.vocoder.hifigan import Generator, GeneratorConfig
from cosy.vocoder.hift import SourceConfig
from cosy.vocoder.model import VocoderConfig, VocoderModel, reconstruction_loss
from cosy.vocoder.streaming import StreamingVocoder
from cosy.vocoder.task import TASK

ROOT = Path(__file__).resolve().parents[1]
MEL_V1 = MelConfig.v1()
MEL_V2 = MelConfig.v2()


def tiny_hifigan(mel: MelConfig = MEL_V1) -> GeneratorConfig:
    """A classic HiFi-GAN: rates multiply to 256 for v1 (8*8*4), 480 for v2 (8*5*4*3)."""
    rates = [8, 8, 4] if mel.hop_length == 256 else [8, 5, 4, 3]
    return GeneratorConfig(base_channels=32 if len(rates) == 3 else 64, upsample_rates=rates,
                           upsample_kernels=[2 * r + r % 2 for r in rates], resblock_kernels=[3, 5],
                           resblock_dilations=[[1, 3], [1, 3]])


def tiny_hift(mel: MelConfig = MEL_V1) -> GeneratorConfig:
    rates = [8, 8] if mel.hop_length == 256 else [8, 5, 3]
    source = SourceConfig(phase="sample" if mel.hop_length == 256 else "frame", f0_channels=16, f0_layers=2,
                          resblock_kernels=[7] * len(rates), resblock_dilations=[[1, 3]] * len(rates))
    return GeneratorConfig(base_channels=32, upsample_rates=rates, upsample_kernels=[2 * r + r % 2 for r in rates],
                           resblock_kernels=[3, 7], resblock_dilations=[[1, 3], [1, 3]], activation="snake",
                           istft_n_fft=16, istft_hop=4, source=source)


def make_generator(kind: str, mel: MelConfig) -> Generator:
    """`kind`: hifigan or hift, with "-nearest" for nearest-neighbour upsampling."""
    torch.manual_seed(0)
    cfg = tiny_hift(mel) if kind.startswith("hift") else tiny_hifigan(mel)
    if kind.endswith("-nearest"):
        cfg = dataclasses.replace(cfg, upsample="nearest")
    gen = Generator(cfg, mel).eval()
    if gen.f0_predictor is not None:  # random weights give ~0 Hz: move f0 into a voiced range
        with torch.no_grad():
            gen.f0_predictor.proj.bias.fill_(150.0)
    return gen


CASES = [("hifigan", MEL_V1), ("hifigan", MEL_V2), ("hift", MEL_V1), ("hift", MEL_V2), ("hift-nearest", MEL_V1)]
IDS = ["hifigan-22k", "hifigan-24k", "hift-22k", "hift-24k", "hift-nearest-22k"]


@pytest.mark.parametrize("kind,mel", CASES, ids=IDS)
@torch.no_grad()
def test_batched_equals_one_by_one(kind, mel):
    gen = make_generator(kind, mel)
    lengths = torch.tensor([23, 9, 16])
    mels = torch.randn(3, mel.n_mels, 23)
    batched, _ = gen(mels, lengths, stochastic=False)
    assert batched.shape == (3, 23 * mel.hop_length)
    for i, n in enumerate(lengths.tolist()):
        alone, _ = gen(mels[i:i + 1, :, :n], stochastic=False)
        assert alone.shape == (1, n * mel.hop_length)
        # tolerance: float32 rounding of differently shaped convolutions
        assert torch.allclose(batched[i, :n * mel.hop_length], alone[0], atol=1e-5)
        assert float(batched[i, n * mel.hop_length:].abs().sum()) == 0.0


@pytest.mark.parametrize("kind,mel", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=[IDS[0], IDS[2], IDS[3], IDS[4]])
@torch.no_grad()
def test_streaming_equals_offline_without_clicks(kind, mel):
    gen = make_generator(kind, mel)
    mels = torch.randn(2, mel.n_mels, 70)
    offline, _ = gen(mels, stochastic=False)
    stream = StreamingVocoder(gen, stochastic=False)
    chunks, pieces, start = [7, 13, 5, 20, 11, 14], [], 0
    for size in chunks:
        pieces.append(stream.push(mels[..., start:start + size]))
        start += size
    pieces.append(stream.flush())
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape == offline.shape
    # with the default context/lookahead (the receptive field) every sample matches:
    # tolerance 1e-4 absolute (float32 rounding of the window-wise computation)
    assert float((streamed - offline).abs().max()) < 1e-4
    # no clicks: the step across each join is no larger than the largest step of the
    # offline audio within one frame of it, plus 1e-4
    join = 0
    hop = mel.hop_length
    for piece in pieces[:-1]:
        join += piece.shape[-1]
        if 0 < join < offline.shape[-1]:
            step = (streamed[:, join] - streamed[:, join - 1]).abs()
            local = offline[:, join - hop:join + hop].diff(dim=-1).abs().amax(dim=-1)
            assert bool((step <= local + 1e-4).all())


@pytest.mark.parametrize("upsample", ["transposed", "nearest"])
@torch.no_grad()
def test_nearest_upsampling_paints_no_pattern_that_repeats_every_frame(upsample):
    """A constant mel through randomly initialised weights: transposed convs give a waveform
    that repeats every hop (a buzz at frame rate), nearest-neighbour upsampling a constant."""
    kind = "hifigan" if upsample == "transposed" else "hifigan-nearest"
    gen = make_generator(kind, MEL_V1)
    mel = torch.randn(1, MEL_V1.n_mels, 1).repeat(1, 1, 40)
    wave, _ = gen(mel)
    middle = wave[0, 10 * MEL_V1.hop_length:30 * MEL_V1.hop_length]
    spread = float(middle.std() / middle.abs().mean())
    assert spread < 1e-4 if upsample == "nearest" else spread > 1e-2


@torch.no_grad()
def test_stochastic_streaming_equals_offline_with_the_same_draws(monkeypatch):
    """With noise on, the stream draws each frame's noise once; offline synthesis fed the
    same draws gives the same audio (tolerance 1e-4 absolute)."""
    gen = make_generator("hift", MEL_V1)
    draws = []
    randn = torch.randn

    def recording_randn(*args, **kwargs):
        draws.append(randn(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(torch, "randn", recording_randn)
    mels = torch.randn(1, 80, 45)
    draws.clear()
    stream = StreamingVocoder(gen, stochastic=True)
    streamed = torch.cat([stream.push(mels[..., i:i + 9]) for i in range(0, 45, 9)] + [stream.flush()], -1)
    source = gen.make_source(gen.predict_f0(mels), uniform=stream.uniform, gaussian=torch.cat(draws, dim=1))
    offline = gen.decode(mels, source)
    assert float((streamed - offline).abs().max()) < 1e-4


@torch.no_grad()
def test_streaming_with_short_context_is_close():
    """Less lookahead trades exactness for latency; the error stays small."""
    gen = make_generator("hift", MEL_V1)
    mels = torch.randn(1, 80, 40)
    offline, _ = gen(mels, stochastic=False)
    stream = StreamingVocoder(gen, context=6, lookahead=6, stochastic=False)
    streamed = torch.cat([stream.push(mels[..., i:i + 10]) for i in range(0, 40, 10)] + [stream.flush()], -1)
    assert streamed.shape == offline.shape
    assert float((streamed - offline).abs().max()) < 0.05


def tiny_model_config(kind: str) -> VocoderConfig:
    mel = MelConfig(sample_rate=8000, n_fft=256, hop_length=64, win_length=256, n_mels=20, fmax=4000.0)
    if kind == "hift":
        gen = GeneratorConfig(base_channels=32, upsample_rates=[4, 4], upsample_kernels=[8, 8],
                              resblock_kernels=[3], resblock_dilations=[[1, 3]], activation="snake",
                              istft_n_fft=16, istft_hop=4,
                              source=SourceConfig(f0_channels=16, f0_layers=2, resblock_kernels=[3, 3],
                                                  resblock_dilations=[[1], [1]]))
    else:
        gen = GeneratorConfig(base_channels=32, upsample_rates=[4, 4, 4], upsample_kernels=[8, 8, 8],
                              resblock_kernels=[3], resblock_dilations=[[1, 3]])
    disc = DiscriminatorConfig(periods=[2, 3], period_channels=[8, 16], resolutions=[[256, 64, 256], [128, 32, 128]],
                               resolution_channels=8)
    return VocoderConfig(mel=mel, generator=gen, discriminator=disc, segment_frames=16)


def tone_batch(cfg: VocoderConfig, batch: int = 4) -> dict:
    """Harmonic tones at random pitches with light noise, and their mel and f0."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        n = cfg.segment_frames * cfg.mel.hop_length
        f = rng.uniform(120, 300)
        t = np.arange(n) / cfg.mel.sample_rate
        wave = 0.4 * np.sin(2 * np.pi * f * t) + 0.15 * np.sin(4 * np.pi * f * t) + 0.01 * rng.standard_normal(n)
        rows.append(wave.astype(np.float32))
    audio = torch.from_numpy(np.stack(rows))
    f0 = [estimate_f0(r, cfg.mel.sample_rate, cfg.mel.hop_length, cfg.segment_frames) for r in rows]
    return {"audio": audio, "mel": mel_spectrogram(audio, cfg.mel), "f0": torch.from_numpy(np.stack(f0))}


@pytest.mark.parametrize("kind", ["hifigan", "hift"])
def test_gan_training_lowers_mel_loss(kind):
    """A few dozen GAN steps on tones, called directly (no trainer); prints the mel L1 curve."""
    torch.manual_seed(0)
    cfg = tiny_model_config(kind)
    model = VocoderModel(cfg).train()
    batch = tone_batch(cfg)
    opt_g = torch.optim.Adam(model.generator.parameters(), 2e-3, betas=(0.8, 0.99))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), 2e-3, betas=(0.8, 0.99))
    curve = []
    for _ in range(30):
        d = model(batch, turn="discriminator")
        opt_d.zero_grad()
        d["loss"].backward()
        opt_d.step()
        g = model(batch, turn="generator")
        opt_g.zero_grad()
        g["loss"].backward()
        opt_g.step()
        curve.append(float(g["mel"]))
        assert torch.isfinite(d["loss"]) and torch.isfinite(g["loss"])
    print(f"{kind} mel L1 every 5 steps:", [round(v, 3) for v in curve[::5]], "last", round(curve[-1], 3))
    assert set(g) >= {"loss", "adversarial", "feature", "mel"} | ({"f0"} if kind == "hift" else set())
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:3])


def test_generator_turn_reuses_the_discriminator_turn_audio():
    torch.manual_seed(0)
    cfg = tiny_model_config("hifigan")
    model = VocoderModel(cfg).train()
    batch = tone_batch(cfg, 2)
    calls = []
    model.generator.register_forward_hook(lambda *_: calls.append(1))
    model(batch, turn="discriminator")
    model(batch, turn="generator")
    assert len(calls) == 1
    model(batch, turn="generator")  # no cached audio left: generates again
    assert len(calls) == 2
    with pytest.raises(CosyError, match="turn"):
        model(batch, turn="both")


def test_warmup_turn_has_only_reconstruction_losses_and_skips_the_discriminator():
    torch.manual_seed(0)
    cfg = tiny_model_config("hift")
    model = VocoderModel(cfg).train()
    batch = tone_batch(cfg, 2)
    calls = []
    model.discriminator.register_forward_hook(lambda *_: calls.append(1))
    warm = model(batch, turn="warmup")
    assert not calls and set(warm) == {"loss", "mel", "f0"}
    torch.testing.assert_close(warm["loss"], cfg.loss.mel * warm["mel"] + cfg.loss.f0 * warm["f0"])
    full = model(batch, turn="generator")
    assert calls and {"adversarial", "feature"} <= set(full)


@pytest.mark.parametrize("source_f0", ["predicted", "target"])
def test_source_f0_drives_the_training_source_only_when_target(source_f0):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config("hift"), source_f0=source_f0)
    model = VocoderModel(cfg).train()
    batch = tone_batch(cfg, 2)
    shifted = {**batch, "f0": batch["f0"] * 1.5}

    def audio(b):
        torch.manual_seed(1)   # the same source noise and phases for both calls
        return model._generate(b)[0]

    moved = (audio(batch) - audio(shifted)).abs().max()
    assert moved > 1e-4 if source_f0 == "target" else moved == 0
    assert "f0" in model(batch, turn="warmup")   # the predictor is trained either way
    model.eval()
    assert (audio(batch) - audio(shifted)).abs().max() == 0   # inference follows the predictor


def test_source_f0_must_be_known():
    with pytest.raises(CosyError, match="config key 'source_f0' must be one of"):
        config.from_dict(VocoderConfig, {"source_f0": "true"})


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


def test_task_processors_and_collate(caplog):
    random.seed(0)
    cfg = config.from_dict(VocoderConfig, config.load_yaml(ROOT / "recipes/mini/conf/vocoder_tiny.yaml")["model"])
    rate, hop = cfg.mel.sample_rate, cfg.mel.hop_length
    t = np.arange(rate) / rate
    rows = [{"utt": "long", "audio": _wav_bytes(0.5 * np.sin(2 * np.pi * 200 * t), rate)},
            {"utt": "short", "audio": _wav_bytes(0.5 * np.sin(2 * np.pi * 200 * t[:3000]), 16000)},
            {"utt": "broken", "audio": b"RIFF not really a wav"}]
    steps = TASK.processors(cfg, True)
    out = [row for row in (process_row(steps, r) for r in rows) if row is not None]
    assert [r["utt"] for r in out] == ["long", "short"]
    assert "broken" in caplog.text
    batch = TASK.collate(out)
    frames = cfg.segment_frames
    assert batch["audio"].shape == (2, frames * hop)
    assert batch["mel"].shape == (2, 80, frames)
    assert batch["f0"].shape == (2, frames)
    voiced = batch["f0"][0][batch["f0"][0] > 0]
    assert len(voiced) > frames // 2 and torch.allclose(voiced, torch.tensor(200.0), rtol=0.02)
    assert TASK.num_frames(out[0]) == frames and TASK.gan


def test_f0_estimator():
    rate, hop = 22050, 256
    t = np.arange(rate) / rate
    f = 150 + 50 * t  # rising 150 -> 200 Hz
    phase = 2 * np.pi * np.cumsum(f) / rate
    wave = 0.5 * np.sin(phase) + 0.2 * np.sin(2 * phase)
    f0 = estimate_f0(wave, rate, hop, 86)
    truth = 150 + 50 * np.arange(86) * hop / rate
    assert np.abs(f0[2:-2] - truth[2:-2]).max() < 2.0  # Hz, away from the signal edges
    noise = np.random.default_rng(0).standard_normal(rate) * 0.1
    assert (estimate_f0(noise, rate, hop, 86) == 0).mean() > 0.9
    assert (estimate_f0(np.zeros(rate), rate, hop, 86) == 0).all()


def test_config_errors_name_the_key():
    with pytest.raises(CosyError, match="upsample_rates"):
        Generator(GeneratorConfig(upsample_rates=[8, 8, 2], upsample_kernels=[16, 16, 4]), MEL_V1)
    with pytest.raises(CosyError, match="upsample_kernels"):
        Generator(GeneratorConfig(upsample_rates=[8, 8, 4], upsample_kernels=[16, 16, 7]), MEL_V1)
    with pytest.raises(CosyError, match="istft_n_fft"):
        Generator(GeneratorConfig(source=SourceConfig()), MEL_V1)
    with pytest.raises(CosyError, match="center"):
        Generator(GeneratorConfig(), MelConfig(center=True))


@pytest.mark.parametrize("path", ["recipes/mini/conf/vocoder_tiny.yaml", "recipes/mini/conf/vocoder_default.yaml",
                                  "recipes/libritts/conf/hift_v1.yaml"])
def test_recipe_configs_build(path):
    data = config.load_yaml(ROOT / path)
    assert data["task"] == "vocoder"
    model = TASK.build(config.from_dict(TASK.config_cls, data["model"]))
    assert isinstance(model.generator, Generator)
    if "hift_v1" in path:  # the published size: 20.46 M generator parameters (reference key listing)
        assert sum(p.numel() for p in model.generator.parameters()) == 20460591


@pytest.mark.parametrize("kind,mel", [CASES[0], CASES[3], CASES[4]], ids=[IDS[0], IDS[3], IDS[4]])
@torch.no_grad()
def test_onnx_export_matches_torch(kind, mel, tmp_path):
    from cosy.vocoder.export import OnnxVocoder, export_onnx

    gen = make_generator(kind, mel).remove_weight_norm()
    export_onnx(gen, tmp_path / "vocoder.onnx")
    runtime = OnnxVocoder(tmp_path / "vocoder.onnx")
    mels = torch.randn(2, mel.n_mels, 13)  # another batch size and length than at export
    if gen.source is None:
        expected = gen.decode(mels)
        got = runtime(mels.numpy())
    else:
        uniform, gaussian = torch.rand(2, 9), torch.randn(2, 13 * mel.hop_length, 9)
        source = gen.make_source(gen.predict_f0(mels), uniform=uniform, gaussian=gaussian)
        expected = gen.decode(mels, source)
        got = runtime(mels.numpy(), uniform.numpy(), gaussian.numpy())
    assert got.shape == tuple(expected.shape)
    assert np.abs(got - expected.numpy()).max() < 1e-4  # float32 kernels of two runtimes


class HelloRecogniser:
    """A stand-in recogniser for the WER hook: it always hears "hello"."""

    name = "hello"

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> str:
        assert samples.ndim == 1 and sample_rate == 8000
        return "hello"


def _experiment(tmp_path: Path) -> Path:
    """A tiny HiFi-GAN experiment dir: config.yaml and a whole-model checkpoint."""
    import yaml
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = tiny_model_config("hifigan")
    expdir = tmp_path / "exp"
    expdir.mkdir()
    (expdir / "config.yaml").write_text(yaml.safe_dump({"task": "vocoder", "model": config.to_dict(cfg)}))
    save_file({k: v.contiguous() for k, v in VocoderModel(cfg).state_dict().items()}, expdir / "step_1.safetensors")
    return expdir


def test_cli_export_and_copy_synthesis_eval(tmp_path, caplog):
    from cosy.cli import main
    from cosy.vocoder.evaluate import evaluate
    from cosy.vocoder.loading import load_generator

    expdir = _experiment(tmp_path)
    ckpt = expdir / "step_1.safetensors"
    assert main(["export", "vocoder", str(ckpt), "--onnx", str(tmp_path / "v.onnx")]) == 0
    assert (tmp_path / "v.onnx").is_file() and (tmp_path / "v.json").is_file()

    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(16000) / 16000
    sf.write(data / "a.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    sf.write(data / "b.wav", 0.3 * np.sin(2 * np.pi * 330 * t[:8000]), 16000)
    (data / "c.wav").write_bytes(b"RIFF broken")
    (data / "wav.scp").write_text("a a.wav\nb b.wav\nc c.wav\n")
    (data / "text").write_text("a hello world\nb hello\nc hello\n")
    (data / "utt2spk").write_text("a s\nb s\nc s\n")
    (data / "spk2utt").write_text("s a b c\n")
    out = tmp_path / "scores.json"
    assert main(["eval", "vocoder", "--data", str(data), "--vocoder", str(ckpt), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["utterances"] == 2 and summary["skipped"] == ["c"] and "c" in caplog.text
    assert summary["log_mel_l1"] > 0 and summary["mcd_db"] > 0  # an untrained vocoder is far off
    assert set(result["utterances"]) == {"a", "b"}
    assert main(["eval", "vocoder", "--data", str(data), "--vocoder", str(ckpt), "--griffin-lim",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["log_mel_l1"] < summary["log_mel_l1"] / 2

    from cosy.data.kaldi import DataDir
    generator, _ = load_generator(ckpt)
    scored = evaluate(DataDir.load(data), generator, HelloRecogniser())["summary"]
    assert scored["wer_vocoded"] == pytest.approx(1 / 3)  # "hello" vs "hello world" and "hello"
    assert "sim_pitch" not in scored

    assert main(["eval", "vocoder", "--data", str(data), "--vocoder", str(tmp_path / "none.safetensors")]) == 1


def test_eval_vocoder_speaker_scores(tmp_path):
    from cosy.data.kaldi import DataDir
    from cosy.vocoder.evaluate import GriffinLim, evaluate

    def pitch_judge(samples, rate):
        """A stand-in judge whose 'voice' is the dominant frequency; finds no speech in silence."""
        spectrum = np.abs(np.fft.rfft(samples))
        if spectrum.max() < 1e-3:
            raise CosyError("no speech")
        angle = np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()] / 1000
        return np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)

    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(8000) / 16000
    table = {"a1": (200, "a"), "a2": (210, "a"), "b1": (1500, "b"), "b2": (1480, "b")}
    for utt, (freq, _) in table.items():
        sf.write(data / f"{utt}.wav", 0.3 * np.sin(2 * np.pi * freq * t), 16000)
    (data / "wav.scp").write_text("".join(f"{u} {u}.wav\n" for u in table))
    (data / "text").write_text("".join(f"{u} hello\n" for u in table))
    (data / "utt2spk").write_text("".join(f"{u} {s}\n" for u, (_, s) in table.items()))

    class Tone(torch.nn.Module):
        """A vocoder that says everything at `freq` Hz (0: silence)."""
        mel = MelConfig()

        def __init__(self, freq):
            super().__init__()
            self.freq = freq

        def forward(self, mel):
            samples = torch.arange(mel.shape[-1] * self.mel.hop_length) / self.mel.sample_rate
            return 0.3 * torch.sin(2 * torch.pi * self.freq * samples)[None].repeat(mel.shape[0], 1), None

    result = evaluate(DataDir.load(data), Tone(1490), embedders={"pitch": pitch_judge})
    summary, per_utt = result["summary"], result["utterances"]
    assert summary["spk_id_pitch_original"] == 1.0  # each original is closest to its own speaker
    assert summary["spk_id_pitch_vocoded"] == 0.5  # every output sounds like speaker b
    assert per_utt["b1"]["sim_pitch"] > 0.99 and per_utt["a1"]["sim_pitch"] < 0.5
    assert summary["sim_pitch"] == pytest.approx(np.mean([s["sim_pitch"] for s in per_utt.values()]))
    silent = evaluate(DataDir.load(data), Tone(0), embedders={"pitch": pitch_judge})["summary"]
    assert silent["spk_id_pitch_vocoded"] == 0.0 and silent["sim_pitch"] == 0.0
    # Griffin-Lim keeps each tone's pitch: every voice survives
    kept = evaluate(DataDir.load(data), GriffinLim(MelConfig()), embedders={"pitch": pitch_judge})["summary"]
    assert kept["spk_id_pitch_vocoded"] == 1.0 and kept["sim_pitch"] > 0.99 and kept["log_mel_l1"] < 0.5
    # by speaker, the voice that is lost shows
    by_speaker = summary["per_speaker"]
    assert sorted(by_speaker) == ["a", "b"] and by_speaker["a"]["utterances"] == 2
    assert by_speaker["a"]["spk_id_pitch_vocoded"] == 0.0 and by_speaker["b"]["spk_id_pitch_vocoded"] == 1.0
    assert by_speaker["a"]["spk_id_pitch_original"] == 1.0
    assert by_speaker["b"]["log_mel_l1"] == pytest.approx(np.mean([per_utt[u]["log_mel_l1"] for u in ("b1", "b2")]))
    assert by_speaker["a"]["closest_pitch_vocoded"] == "b" and by_speaker["a"]["closest_pitch_original"] == "a"
    assert set(by_speaker["a"]) == set(by_speaker["b"]) and summary["source_f0"] == "none"


def test_eval_vocoder_scores_the_f0_predictor_and_can_drive_the_source_with_the_recording_f0(tmp_path, monkeypatch):
    from cosy.data.kaldi import DataDir
    from cosy.vocoder.evaluate import GriffinLim, copy_synthesis, evaluate

    torch.manual_seed(0)
    cfg = tiny_model_config("hift")
    gen = Generator(cfg.generator, cfg.mel).eval()
    rate, hop = cfg.mel.sample_rate, cfg.mel.hop_length
    t = np.arange(rate) / rate
    wave = (0.3 * np.sin(2 * np.pi * 150 * t) + 0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    frames = len(mel_spectrogram(torch.from_numpy(wave)[None], cfg.mel)[0, 0])
    truth = estimate_f0(wave, rate, hop, frames, 60.0, 600.0)
    assert (truth > 0).mean() > 0.8

    sources = []
    make_source = gen.make_source
    monkeypatch.setattr(gen, "make_source", lambda f0, *a, **kw: sources.append(f0.clone()) or make_source(f0, *a, **kw))
    predictor = lambda scale: lambda mel, lengths=None: torch.from_numpy(truth[:mel.shape[-1]] * scale)[None]  # noqa: E731
    for scale, gpe, cents in ((1.0, 0.0, 0.0), (2.0, 1.0, 1200.0)):
        monkeypatch.setattr(gen, "predict_f0", predictor(scale))
        _, scores = copy_synthesis(gen, wave)
        assert scores["f0_predictor_gpe"] == gpe and scores["f0_predictor_rmse_cents"] == pytest.approx(cents, abs=1e-3)
        assert torch.equal(sources[-1], torch.from_numpy(truth * scale)[None])  # the predictor's f0 drives the source
    _, scores = copy_synthesis(gen, wave, recording_f0=True)
    assert torch.equal(sources[-1], torch.from_numpy(truth)[None])  # the recording's f0 does
    assert scores["f0_predictor_gpe"] == 1.0  # still the predictor's own score (one octave up)
    # the f0 search range is the one the vocoder was trained with
    copy_synthesis(gen, wave, (200.0, 600.0), recording_f0=True)
    assert torch.equal(sources[-1], torch.from_numpy(estimate_f0(wave, rate, hop, frames, 200.0, 600.0))[None])
    assert not torch.equal(sources[-1], torch.from_numpy(truth)[None])

    # through evaluate: overall and by speaker, and the summary says which f0 drove the source
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "a.wav", wave, rate)
    sf.write(data / "b.wav", wave[: rate // 2], rate)
    (data / "wav.scp").write_text("a a.wav\nb b.wav\n")
    (data / "text").write_text("a hello\nb hello\n")
    (data / "utt2spk").write_text("a s1\nb s2\n")
    summary = evaluate(DataDir.load(data), gen, recording_f0=True)["summary"]
    assert summary["source_f0"] == "recording" and summary["f0_predictor_gpe"] == 1.0
    assert summary["per_speaker"]["s2"]["f0_predictor_gpe"] == 1.0 and summary["per_speaker"]["s2"]["utterances"] == 1
    half = wave[: rate // 2]
    half_frames = mel_spectrogram(torch.from_numpy(half)[None], cfg.mel).shape[-1]
    # the last source was b's own f0 (a 150 Hz tone), not the predictor's 300 Hz
    assert sources[-1].shape == (1, half_frames) and ((sources[-1] - 150).abs() < 5).float().mean() > 0.8

    _, plain = copy_synthesis(GriffinLim(cfg.mel), wave)
    assert "f0_predictor_gpe" not in plain
    with pytest.raises(CosyError, match="HiFT"):
        copy_synthesis(GriffinLim(cfg.mel), wave, recording_f0=True)


def test_cli_eval_vocoder_refuses_the_recording_f0_without_a_source(tmp_path, capsys):
    from cosy.cli import main

    # refused before the (missing) data and checkpoint are even looked at
    assert main(["eval", "vocoder", "--data", str(tmp_path / "none"), "--vocoder", str(tmp_path / "none.safetensors"),
                 "--griffin-lim", "--recording-f0"]) == 1
    assert "--griffin-lim and --recording-f0" in capsys.readouterr().err
    ckpt = _experiment(tmp_path) / "step_1.safetensors"  # HiFi-GAN: no source to drive
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
    (data / "wav.scp").write_text("a a.wav\n")
    (data / "text").write_text("a hello\n")
    (data / "utt2spk").write_text("a s\n")
    assert main(["eval", "vocoder", "--data", str(data), "--vocoder", str(ckpt), "--recording-f0"]) == 1
    assert "needs a HiFT vocoder" in capsys.readouterr().err


def test_eval_vocoder_fits_the_vocoder_to_each_speakers_first_readable_recording(tmp_path, capsys, monkeypatch):
    from cosy.cli import main

    ckpt = _experiment(tmp_path) / "step_1.safetensors"
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(12000) / 16000
    for utt, f in (("b", 150), ("c", 220), ("d", 230), ("e", 160)):
        sf.write(data / f"{utt}.wav", 0.3 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(4 * np.pi * f * t), 16000)
    (data / "a.wav").write_bytes(b"RIFF broken")
    (data / "wav.scp").write_text("".join(f"{u} {u}.wav\n" for u in "abcde"))
    (data / "text").write_text("".join(f"{u} hello\n" for u in "abcde"))
    (data / "utt2spk").write_text("a s1\nb s1\nc s2\nd s2\ne s1\n")
    runs = {}
    for name, extra in (("plain", []), ("fitted", ["--adapt-steps", "3", "--adapt-lr", "2e-3"])):
        assert main(["eval", "vocoder", "--data", str(data), "--vocoder", str(ckpt), "--out",
                     str(tmp_path / f"{name}.json"), *extra]) == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    fitted = runs["fitted"]
    assert fitted["summary"]["fitted_on"] == {"s1": "b", "s2": "c"}  # a is unreadable
    assert set(fitted["utterances"]) == {"d", "e"} and fitted["summary"]["skipped"] == ["a"]
    assert "fitted_on" not in runs["plain"]["summary"] and set(runs["plain"]["utterances"]) == set("bcde")
    for utt in "de":  # the fitted copies, not the checkpoint, vocoded them
        assert fitted["utterances"][utt]["log_mel_l1"] != runs["plain"]["utterances"][utt]["log_mel_l1"]
    # each speaker's recordings are vocoded by the copy fitted to that speaker
    import cosy.vocoder.evaluate as evaluate_module
    from cosy.data.kaldi import DataDir
    from cosy.vocoder.loading import load_generator

    copies, used = [], []
    plain_copy = evaluate_module.copy_synthesis

    def fit(wave):
        copies.append(load_generator(ckpt)[0])
        return copies[-1]

    monkeypatch.setattr(evaluate_module, "copy_synthesis",
                        lambda generator, *args: used.append(generator) or plain_copy(generator, *args))
    evaluate_module.evaluate(DataDir.load(data), load_generator(ckpt)[0], fit=fit)
    assert len(copies) == 2 and len(used) == 2
    assert used[0] is copies[1] and used[1] is copies[0]  # d (s2) by c's copy, e (s1) by b's
    for extra, message in ((["--griffin-lim", "--adapt-steps", "2"], "--griffin-lim and --adapt-steps"),
                           (["--adapt-steps", "-1"], "--adapt-steps must be >= 0")):
        assert main(["eval", "vocoder", "--data", str(data), "--vocoder", str(ckpt), *extra]) == 1
        assert message in capsys.readouterr().err


def test_pitch_errors():
    from cosy.vocoder.evaluate import pitch_errors

    rate, hop = 22050, 256
    t = np.arange(rate) / rate
    tone = lambda f: (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    same = pitch_errors(tone(150), tone(150), rate, hop)
    assert same["f0_gpe"] == 0.0 and same["f0_rmse_cents"] < 5
    shifted = pitch_errors(tone(150), tone(225), rate, hop)   # a fifth up: 702 cents
    assert shifted["f0_gpe"] == 1.0 and shifted["f0_rmse_cents"] == pytest.approx(702, abs=15)
    assert pitch_errors(tone(150), np.zeros_like(t, dtype=np.float32), rate, hop) == {}


def test_mel_cepstral_distortion():
    from cosy.vocoder.evaluate import mel_cepstral_distortion

    mel = torch.randn(80, 30)
    assert mel_cepstral_distortion(mel, mel) == 0.0
    shifted = mel + 1.0  # a constant offset lives in c0 only, which MCD leaves out
    assert mel_cepstral_distortion(mel, shifted) < 1e-4
    assert mel_cepstral_distortion(mel, torch.randn(80, 30)) > 1.0


@pytest.mark.parametrize("kind", ["hifigan", "hift"])
def test_fitting_to_a_recording_lowers_its_loss_and_leaves_the_model_alone(kind):
    from cosy.vocoder.adapt import fit_to_recording

    torch.manual_seed(0)
    cfg = tiny_model_config(kind)
    generator = VocoderModel(cfg).generator.eval().remove_weight_norm()  # as loaded for synthesis
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    n = 3 * cfg.mel.sample_rate
    t = np.arange(n) / cfg.mel.sample_rate
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)   # a gliding voice, unlike anything it has seen
    phase = 2 * np.pi * np.cumsum(pitch) / cfg.mel.sample_rate
    wave = (0.4 * np.sin(phase) + 0.2 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)).astype(np.float32)
    audio = torch.from_numpy(wave[:len(wave) // cfg.mel.hop_length * cfg.mel.hop_length])[None]
    mel = mel_spectrogram(audio, cfg.mel)
    f0 = torch.from_numpy(estimate_f0(audio[0].numpy(), cfg.mel.sample_rate, cfg.mel.hop_length, mel.shape[2]))[None]
    batch = {"audio": audio, "mel": mel, "f0": f0}

    def loss(gen):
        with torch.no_grad():
            fake, predicted = gen(mel, stochastic=False) if gen.source is not None else gen(mel)
            return reconstruction_loss(cfg, fake, predicted, batch)[1]

    stream = torch.get_rng_state()
    with torch.inference_mode():  # as CosyTTS.convert calls it
        fitted = fit_to_recording(generator, cfg, wave, steps=40, lr=2e-3, batch_size=4)
    assert torch.equal(torch.get_rng_state(), stream)  # the caller's random stream has not moved
    start, end = loss(generator), loss(fitted)
    print(kind, {k: (round(float(start[k]), 3), round(float(end[k]), 3)) for k in start})
    assert float(end["mel"]) < 0.8 * float(start["mel"])
    if kind == "hift":
        assert float(end["f0"]) < 0.8 * float(start["f0"])
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in before.items())
    assert not fitted.training
    again = fit_to_recording(generator, cfg, wave, steps=3, lr=2e-3, batch_size=4, seed=5)
    same = fit_to_recording(generator, cfg, wave, steps=3, lr=2e-3, batch_size=4, seed=5)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(CosyError, match="at least 1 step"):
        fit_to_recording(generator, cfg, wave, steps=0, lr=1e-4)
    with pytest.raises(CosyError, match="learning rate > 0"):
        fit_to_recording(generator, cfg, wave, steps=1, lr=0.0)
