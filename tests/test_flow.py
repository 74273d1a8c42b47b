"""Flow decoder behaviour: training, solver, streaming, checkpoints, ONNX, data task."""

from __future__ import annotations

import io as pyio
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import save_file

from cosy import cli
from cosy.audio import FrequencyWarpConfig, MelConfig
from cosy.errors import CosyError
from cosy.flow.cfm import CFMConfig, cfm_loss, euler, guided
from cosy.flow.estimator import EstimatorConfig, RecentKV
from cosy.flow.model import FlowConfig, FlowModel
from cosy.flow.onnx import export_estimator, load_model, onnx_max_diff
from cosy.flow.task import TASK
from cosy.modules.transformer import EncoderConfig
from cosy.train.task import process_row

torch.set_num_threads(1)


def tiny(causal: bool = False, **kw) -> FlowConfig:
    """25 tokens/s and 50 frames/s (2 frames per token), 16 mels."""
    values = dict(
        vocab_size=32, token_rate=25.0, spk_dim=8,
        mel=MelConfig(sample_rate=8000, n_fft=320, hop_length=160, win_length=320, n_mels=16, fmax=4000.0),
        encoder=EncoderConfig(input_size=32, d_model=32, n_heads=2, ffn_dim=64, n_layers=2, layer="conformer",
                              dropout=0.0, positional_dropout=0.0),
        regulator_convs=2, edge_tokens=4,
        estimator=EstimatorConfig(channels=[32, 32], n_blocks=1, n_mid_blocks=1, heads=2, head_dim=16),
        causal=causal, chunk_tokens=4, lookahead=2, left_chunks=1,
    )
    values.update(kw)
    return FlowConfig(**values)


# ----------------------------------------------------------------- flow matching core
def test_cfm_loss_is_zero_for_the_exact_velocity():
    """An oracle that knows x1 recovers u = x1 - (1 - sigma) z from x_t: loss < 1e-10."""
    torch.manual_seed(0)
    x1, cfg = torch.randn(3, 4, 10), CFMConfig()
    mask = torch.ones(3, 1, 10)

    def oracle(xt, mask, mu, t, spks, cond):
        t = t.view(-1, 1, 1)
        z = (xt - t * x1) / (1 - (1 - cfg.sigma_min) * t)
        return x1 - (1 - cfg.sigma_min) * z

    loss = cfm_loss(oracle, x1, mask, torch.zeros_like(x1), torch.zeros(3, 4), torch.zeros_like(x1), cfg)
    assert float(loss) < 1e-10
    wrong = cfm_loss(lambda *a: torch.zeros_like(x1), x1, mask, x1, torch.zeros(3, 4), x1, cfg)
    assert float(wrong) > 0.5


def test_euler_on_cosine_schedule_follows_the_straight_path():
    """With the OT field of a known target, 10 cosine steps land on it (tolerance 1e-4)."""
    torch.manual_seed(0)
    x1, z, cfg = torch.randn(1, 4, 6), torch.randn(1, 4, 6), CFMConfig()
    times = []

    def field(x, mask, mu, t, spks, cond):
        times.append(float(t[0]))
        return (x1 - (1 - cfg.sigma_min) * x) / (1 - (1 - cfg.sigma_min) * t.view(-1, 1, 1))

    out = euler(field, z, torch.ones(1, 1, 6), z, torch.zeros(1, 4), z, cfg)
    assert float((out - x1).abs().max()) < 1e-4
    assert len(times) == 10 and times[0] == 0.0
    assert times[1] == pytest.approx(1 - math.cos(math.pi / 20), abs=1e-6)


def test_dropout_draws_drop_everything_or_only_the_voice():
    """Each sample keeps all conditions, loses all, or keeps only the tokens (mu), in the
    configured shares; without voice dropout the same draws drop the same samples."""
    seen = []

    def record(xt, mask, mu, t, spks, cond):
        seen.append((mu[:, 0, 0] != 0, spks[:, 0] != 0, cond[:, 0, 0] != 0))
        return torch.zeros_like(xt)

    n = 4000
    x1, ones = torch.randn(n, 2, 3), torch.ones(n, 2, 3)
    for voice in (0.5, 0.0):
        cfm_loss(record, x1, torch.ones(n, 1, 3), ones, torch.ones(n, 2), ones,
                 CFMConfig(cfg_dropout=0.2, voice_dropout=voice), generator=torch.Generator().manual_seed(0))
    (mu, spks, cond), (mu0, spks0, cond0) = seen
    assert torch.equal(spks, cond) and torch.equal(spks0, cond0) and torch.equal(mu0, spks0)
    assert not (spks & ~mu).any()  # the voice is never kept without the tokens
    assert torch.equal(mu, mu0)  # the same samples lose everything
    assert abs(float((~mu).float().mean()) - 0.2) < 0.03
    assert abs(float((mu & ~spks).float().mean()) - 0.5) < 0.03


def test_voice_guidance_adds_the_tokens_only_contrast():
    """guided = (1 + g) v(mu, spk, cond) - g v(0, 0, 0) + w (v(mu, spk, cond) - v(mu, 0, 0)),
    with the voice row evaluated only when w is set."""
    rows = []

    def field(x, mask, mu, t, spks, cond):
        rows.append(x.shape[0])
        return x + 2 * mu + 3 * spks[:, :, None] + 5 * cond

    x, mu, cond, spks = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 4)
    t, mask = torch.full((2,), 0.3), torch.ones(2, 1, 6)
    full, bare, tokens_only = field(x, mask, mu, t, spks, cond), x, x + 2 * mu
    plain = guided(field, CFMConfig(guidance=0.7))(x, mask, mu, t, spks, cond)
    torch.testing.assert_close(plain, 1.7 * full - 0.7 * bare)
    voiced = guided(field, CFMConfig(guidance=0.7, voice_guidance=1.5))(x, mask, mu, t, spks, cond)
    torch.testing.assert_close(voiced, 1.7 * full - 0.7 * bare + 1.5 * (full - tokens_only))
    assert rows == [2, 4, 6]  # the direct call, then 2 and 3 rows per sample
    with pytest.raises(CosyError, match="model.cfm.voice_dropout"):
        FlowModel(tiny(cfm=CFMConfig(cfg_dropout=0.6, voice_dropout=0.5)))


# ----------------------------------------------------------------------- training
def test_tiny_model_overfits_one_utterance():
    """One utterance (repeated 8 times per batch, so that each step sees 8 flow times):
    the loss falls below a third of its start and the generated mel's mean L1 to the
    target drops well under that of predicting the target's mean (both printed)."""
    torch.manual_seed(0)
    model = FlowModel(tiny())
    frames, copies = 40, 8
    t = torch.arange(frames).float()
    target = torch.stack([torch.sin(t / 4 + k) * (k % 3) - k / 8 for k in range(16)])[None]  # (1, 16, 40)
    tokens, emb = torch.randint(0, 32, (1, frames // 2)), torch.randn(1, 8)
    batch = {"speech_token": tokens.repeat(copies, 1), "speech_token_len": torch.full((copies,), 20),
             "speech_feat": target.repeat(copies, 1, 1), "speech_feat_len": torch.full((copies,), frames),
             "embedding": emb.repeat(copies, 1)}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = np.mean(losses[:10]), np.mean(losses[-20:])
    model.eval()
    mel = model.inference(tokens, tokens[:, :0], target[:, :, :0], emb, generator=torch.Generator().manual_seed(0))
    l1 = float((mel - target).abs().mean())
    baseline = float((target - target.mean()).abs().mean())
    print(f"overfit: loss {start:.3f} -> {end:.3f}; generated mel L1 {l1:.3f} (mean-mel baseline {baseline:.3f})")
    assert mel.shape == target.shape
    assert end < start / 3
    assert l1 < 0.7 * baseline


def test_speed_and_seeded_noise():
    model = FlowModel(tiny()).eval()
    tokens, emb = torch.randint(0, 32, (1, 10)), torch.randn(1, 8)
    prompt, prompt_feat = torch.randint(0, 32, (1, 3)), torch.randn(1, 16, 6)

    def run(seed, speed=1.0):
        return model.inference(tokens, prompt, prompt_feat, emb, speed=speed,
                               generator=torch.Generator().manual_seed(seed))

    assert run(0).shape == (1, 16, 20)  # 10 tokens at 25 Hz -> 0.4 s -> 20 frames
    assert run(0, speed=2.0).shape == (1, 16, 10)
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_bad_inference_inputs_are_named():
    model = FlowModel(tiny()).eval()
    ok = dict(tokens=torch.randint(0, 32, (1, 6)), prompt_tokens=torch.randint(0, 32, (1, 2)),
              prompt_feat=torch.randn(1, 16, 4), embedding=torch.randn(1, 8))
    for key, bad, message in [("tokens", torch.full((1, 6), 32), "model.vocab_size"),
                              ("prompt_feat", torch.randn(1, 20, 4), "model.mel.n_mels"),
                              ("embedding", torch.randn(1, 5), "model.spk_dim")]:
        with pytest.raises(CosyError, match=message.replace(".", r"\.")):
            model.inference(**{**ok, key: bad})
    assert model.inference(**{**ok, "tokens": ok["tokens"][:, :0]}).shape == (1, 16, 0)


# ---------------------------------------------------------------------- streaming
@pytest.mark.parametrize("left_chunks,voice_guidance", [(1, 0.0), (-1, 0.0), (1, 1.0)])
def test_streaming_equals_offline_causal_model(left_chunks, voice_guidance):
    """Chunked decoding (pushes of uneven sizes, a 7-token prompt, a partial last chunk) gives the
    offline output of the same causal model with the same noise (tolerance 1e-5)."""
    torch.manual_seed(0)
    model = FlowModel(tiny(causal=True, left_chunks=left_chunks,
                           cfm=CFMConfig(voice_guidance=voice_guidance))).eval()
    tokens, prompt = torch.randint(0, 32, (1, 23)), torch.randint(0, 32, (1, 7))
    prompt_feat, emb = torch.randn(1, 16, 15), torch.randn(1, 8)
    noise = torch.randn(1, 16, 2 * 30)
    offline = model.inference(tokens, prompt, prompt_feat, emb, noise=noise)
    stream = model.stream(prompt, prompt_feat, emb, noise=noise)
    assert stream.done == 4  # the first prompt chunk (and its look-ahead) is decoded at the start
    parts = [stream.push(tokens[:, a:b]) for a, b in [(0, 1), (1, 8), (8, 9), (9, 20), (20, 23)]]
    parts.append(stream.finish())
    assert parts[0].shape[2] == 0  # the first chunk still waits for look-ahead tokens
    assert sum(p.shape[2] for p in parts[:-1]) > 0  # output flows before the end
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == offline.shape == (1, 16, 46)
    assert float((streamed - offline).abs().max()) < 1e-5


def test_streaming_state_stays_bounded():
    """With left_chunks = 1 every attention cache keeps at most one chunk of keys, so a
    chunk's work does not grow with the number of chunks before it."""
    model = FlowModel(tiny(causal=True, left_chunks=1)).eval()
    stream = model.stream(torch.randint(0, 32, (1, 2)), torch.randn(1, 16, 4), torch.randn(1, 8))
    stream.push(torch.randint(0, 32, (1, 60)))
    chunk_frames = model.cfg.chunk_tokens * model.cfg.ratio
    caches = [v for step in stream.step_caches for v in step.values() if isinstance(v, RecentKV)]
    assert len(caches) == 10 * 5  # 10 solver steps x 5 transformer blocks
    assert all(c.k.shape[2] <= chunk_frames for c in caches)


def test_offline_model_refuses_to_stream():
    model = FlowModel(tiny())
    with pytest.raises(CosyError, match="causal"):
        model.stream(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 16, 0), torch.randn(1, 8))


# -------------------------------------------------------------------- checkpoints
def write_experiment(tmp_path, cfg: FlowConfig, model_cfg: FlowConfig):
    """A checkpoint of `model_cfg` beside a config.yaml describing `cfg`."""
    from cosy import config as cfgio

    save_file(FlowModel(model_cfg).state_dict(), str(tmp_path / "step_1.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"task": "flow", "model": cfgio.to_dict(cfg)}))
    return tmp_path / "step_1.safetensors"


@pytest.mark.parametrize("change,key", [
    (dict(vocab_size=40), "model.vocab_size"),
    (dict(spk_dim=12), "model.spk_dim"),
    (dict(mel=MelConfig(sample_rate=8000, n_fft=320, hop_length=160, win_length=320, n_mels=20)),
     "model.mel.n_mels"),
])
def test_mismatched_checkpoint_names_the_config_key(tmp_path, change, key):
    ckpt = write_experiment(tmp_path, tiny(**change), tiny())
    with pytest.raises(CosyError, match=key.replace(".", r"\.")) as err:
        load_model(ckpt)
    assert str(ckpt) in str(err.value)


def test_matching_checkpoint_loads(tmp_path):
    ckpt = write_experiment(tmp_path, tiny(), tiny())
    model = load_model(ckpt)
    assert not model.training
    assert model.embedding.weight.shape == (32, 32)


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("causal", [False, True])
def test_onnx_estimator_matches_torch(tmp_path, causal):
    """onnxruntime on new lengths and batch rows agrees with torch within 1e-4."""
    model = FlowModel(tiny(causal=causal)).eval()
    export_estimator(model, tmp_path / "est.onnx")
    assert onnx_max_diff(model, tmp_path / "est.onnx", frames=37) < 1e-4


def test_export_command(tmp_path, capsys):
    from cosy import config as cfgio

    conf = tmp_path / "flow.yaml"
    conf.write_text(yaml.safe_dump({"task": "flow", "model": cfgio.to_dict(tiny())}))
    assert cli.main(["export", "flow", str(conf), "--onnx", str(tmp_path / "out.onnx")]) == 0
    assert (tmp_path / "out.onnx").stat().st_size > 0
    conf.write_text(yaml.safe_dump({"task": "flow", "model": {"vocab_sise": 3}}))
    assert cli.main(["export", "flow", str(conf), "--onnx", str(tmp_path / "bad.onnx")]) == 1
    assert "model.vocab_sise" in capsys.readouterr().err


# --------------------------------------------------------------------------- task
def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = pyio.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def test_bf16_autocast_tracks_fp32():
    """The recipes train the decoder under bf16 autocast; the seed fixes its flow times,
    noise and dropout draws, so both passes see the same ones."""
    from precision import assert_bf16_tracks_fp32

    torch.manual_seed(0)
    model = FlowModel(tiny())
    frames = 40
    batch = {"speech_token": torch.randint(0, 32, (3, frames // 2)), "speech_token_len": torch.tensor([20, 14, 9]),
             "speech_feat": torch.randn(3, 16, frames), "speech_feat_len": torch.tensor([40, 28, 18]),
             "embedding": torch.randn(3, 8)}
    assert_bf16_tracks_fp32(model, batch)


def test_task_rows_to_batch_to_loss():
    cfg = tiny()
    steps = TASK.processors(cfg, True)
    rows = [process_row(steps, {"utt": f"u{i}", "audio": wav_bytes(sec), "speech_token": list(range(n)),
                                "embedding": [0.1] * 8})
            for i, (sec, n) in enumerate([(0.5, 14), (0.3, 5)])]
    assert rows[0]["speech_token"].shape == (12,)  # 0.5 s at 25 tokens/s: extra tokens cut
    assert rows[0]["speech_feat"].shape == (16, 24)  # 12 tokens -> 24 frames of the 25
    assert rows[1]["speech_feat"].shape == (16, 10)
    assert TASK.num_frames(rows[0]) == 24
    assert process_row(steps, {"utt": "x", "audio": wav_bytes(0.2), "speech_token": None, "embedding": [0.1] * 8}) is None
    with pytest.raises(CosyError, match="model.spk_dim"):
        process_row(steps, {"utt": "y", "audio": wav_bytes(0.2), "speech_token": [1], "embedding": [0.1] * 3})
    with pytest.raises(CosyError):  # corrupt audio: the loader logs the utterance and skips it
        process_row(steps, {"utt": "z", "audio": b"not audio", "speech_token": [1], "embedding": [0.1] * 8})
    batch = TASK.collate(rows)
    assert batch["speech_feat"].shape == (2, 16, 24)
    assert batch["speech_feat_len"].tolist() == [24, 10]
    assert batch["speech_token_len"].tolist() == [12, 5]
    loss = TASK.build(cfg)(batch)["loss"]
    assert torch.isfinite(loss) and loss.item() > 0


def test_frequency_warp_changes_training_items_and_gives_them_the_longest_prompt():
    torch.manual_seed(0)
    feat = torch.randn(3, 16, 20)
    feat_len = torch.tensor([20, 15, 10])
    plain = FlowModel(tiny()).train()
    same, warped = plain._warp(feat)
    assert same is feat and not warped.any()
    model = FlowModel(tiny(warp=FrequencyWarpConfig(prob=1.0, max_factor=1.3)))
    model.load_state_dict(plain.state_dict())
    model.eval()
    assert model._warp(feat)[0] is feat  # inference is never warped
    model.train()
    out, warped = model._warp(feat)
    assert warped.all() and not torch.allclose(out, feat)
    cond = model._random_prompt(out, feat_len, warped)
    longest = (feat_len.float() * model.cfg.cfm.prompt_max).long()
    for i, n in enumerate(longest.tolist()):
        torch.testing.assert_close(cond[i, :, :n], out[i, :, :n])
        assert bool((cond[i, :, n:] == 0).all())
    # with prob 0 the training draws are those of a model without the option
    batch = {"speech_token": torch.randint(0, 32, (2, 6)), "speech_token_len": torch.tensor([6, 4]),
             "speech_feat": torch.randn(2, 16, 12), "speech_feat_len": torch.tensor([12, 8]),
             "embedding": torch.randn(2, 8)}
    off = FlowModel(tiny(warp=FrequencyWarpConfig(prob=0.0))).train()
    off.load_state_dict(plain.state_dict())
    # no dropout draws in the comparison
    plain.encoder.eval()
    off.encoder.eval()
    torch.manual_seed(1)
    a = plain(batch)["loss"]
    torch.manual_seed(1)
    b = off(batch)["loss"]
    torch.testing.assert_close(a, b)
    for bad in (FrequencyWarpConfig(prob=1.5), FrequencyWarpConfig(max_factor=0.8)):
        with pytest.raises(CosyError, match="model.warp"):
            FlowModel(tiny(warp=bad))
