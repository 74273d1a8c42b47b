import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import transformers
import yaml
from safetensors.numpy import load_file

from cosy.audio import WhisperMelConfig, save_audio, whisper_log_mel
from cosy.cli import main as cli_main
from cosy.checkpoint import load_weights
from cosy.config import from_dict
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError
from cosy.modules import lengths_to_mask
from cosy.text.bpe import TextTokenizer
from cosy.tokenizer.adversary import SpeakerAdversary, SpeakerAdversaryConfig
from cosy.tokenizer.asr_head import greedy_ctc
from cosy.tokenizer.evaluate import evaluate, format_markdown, nearest_centroid_accuracy, speaker_split
from cosy.tokenizer.extract import OnnxBackend, TorchBackend, extract, load_checkpoint, merge_parts, save_tokens
from cosy.tokenizer.model import TokenizerConfig, TokenizerModel
from cosy.tokenizer.onnx import export_onnx
from cosy.tokenizer.task import TASK
from cosy.train.checkpoint import save_weights
from cosy.train.task import process_row

SR = 16000


def tiny_model_dict(vocab_size=300, input_layer="conv2d2", quantizer=None, **extra):
    enc = {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "dropout": 0.0, "positional_dropout": 0.0, "pos_enc": "rotary"}
    return {
        "vocab_size": vocab_size,
        "encoder1": {**enc, "input_size": 128, "n_layers": 2, "input_layer": input_layer},
        "encoder2": {**enc, "input_size": 32, "n_layers": 1, "input_layer": "none"},
        "decoder": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 1, "dropout": 0.0},
        "quantizer": quantizer or {"kind": "fsq", "levels": [3, 3, 3, 3]},
        **extra,
    }


def tiny_model(**kw) -> TokenizerModel:
    torch.manual_seed(0)
    return TokenizerModel(from_dict(TokenizerConfig, tiny_model_dict(**kw), "model")).eval()


def random_feats(lengths, seed=0):
    """Padded log-mel-like features (batch, 128, max) with zeros past each length."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), 128, max(lengths), generator=g)
    for row, n in enumerate(lengths):
        feats[row, :, n:] = 0
    return feats, torch.tensor(lengths)


def tone(seconds, freq, seed, rate=SR):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def make_data_dir(root: Path, durations=(0.5, 1.3, 0.8, 2.1, 0.3, 1.0), speakers=2) -> DataDir:
    """Tone 'utterances'; speaker k's tones sit near 200 * (k + 1) Hz."""
    wav, text, utt2spk = {}, {}, {}
    for i, seconds in enumerate(durations):
        spk = f"spk{i % speakers}"
        utt = f"{spk}_utt{i:02d}"
        path = root / "wavs" / f"{utt}.wav"
        save_audio(path, tone(seconds, 200 * (i % speakers + 1) + 10 * i, i), SR)
        wav[utt], text[utt], utt2spk[utt] = str(path), f"hello world number {i}", spk
    data = DataDir(wav, text, utt2spk)
    data.save(root)
    return data


def save_checkpoint(model: TokenizerModel, expdir: Path, model_dict: dict) -> Path:
    expdir.mkdir(parents=True, exist_ok=True)
    (expdir / "config.yaml").write_text(yaml.safe_dump({"task": "tokenizer", "model": model_dict}))
    save_weights(expdir / "step_1.safetensors", model.state_dict())
    return expdir / "step_1.safetensors"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    (root / "corpus.txt").write_text("hello world number one two three\n" * 20)
    tokenizer = TextTokenizer.train([root / "corpus.txt"], vocab_size=300)
    tokenizer.save(root / "tokenizer.json")
    return str(root / "tokenizer.json"), tokenizer.vocab_size


# ---------------------------------------------------------------------------------- model


@pytest.mark.parametrize("quantizer", [{"kind": "fsq", "levels": [3, 3, 3, 3]},
                                       {"kind": "vq", "codebook_size": 16}, {"kind": "none"}])
def test_forward_returns_joint_loss_and_gradients_reach_encoder1(quantizer):
    model = tiny_model(quantizer=quantizer).train()
    feats, lengths = random_feats([90, 61])
    batch = {"feats": feats, "feats_lengths": lengths,
             "text_ids": torch.tensor([[5, 6, 7, 8], [9, 10, -1, -1]]), "text_lengths": torch.tensor([4, 2])}
    out = model(batch)
    expected = 0.3 * out["ctc"] + 0.7 * out["att"] + out.get("commit", 0.0)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
    assert ("commit" in out) == (quantizer["kind"] == "vq")
    out["loss"].backward()
    grad = model.encoder1.input_layer.convs[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("input_layer,factor", [("conv2d2", 2), ("conv2d4", 4), ("conv1d2", 2), ("conv1d4", 4)])
def test_token_rate_and_padded_batch_equals_one_by_one(input_layer, factor):
    model = tiny_model(input_layer=input_layer, quantizer={"kind": "vq", "codebook_size": 64})
    assert model.token_rate == 100 / factor
    lengths = [97, 40, 13]
    feats, lens = random_feats(lengths)
    tokens, counts = model.tokenize(feats, lens)
    assert tokens.shape == (3, math.ceil(97 / factor))
    assert counts.tolist() == [math.ceil(n / factor) for n in lengths]
    for row, n in enumerate(lengths):
        alone, _ = model.tokenize(feats[row:row + 1, :, :n], lens[row:row + 1])
        assert alone[0].equal(tokens[row, :counts[row]])


def test_attention_decoder_loss_does_not_depend_on_batch_padding():
    model = tiny_model()
    feats, lengths = random_feats([80, 50])
    targets, target_lengths = torch.tensor([[5, 6, 7], [9, 10, -1]]), torch.tensor([3, 2])
    x, n = model.encode(feats, lengths)
    x, n = model.encoder2(model.quantizer(x)[0], n)
    both, _ = model.decoder(x, n, targets, target_lengths)
    one, _ = model.decoder(x[1:, :n[1]], n[1:], targets[1:, :2], target_lengths[1:])
    zero, _ = model.decoder(x[:1], n[:1], targets[:1], target_lengths[:1])
    # the batch loss is the token-weighted mean of the per-row losses (3 + 1 and 2 + 1 targets)
    torch.testing.assert_close(both, (4 * zero + 3 * one) / 7, rtol=1e-5, atol=1e-5)


def test_tiny_model_learns_to_transcribe_one_utterance():
    """Three 0.4 s stretches of distinct spectra should come out as three BPE ids, in order."""
    model = tiny_model(quantizer={"kind": "none"}).train()
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(3, 128, 1, generator=g)
    feats = torch.cat([p.expand(-1, 40) for p in patterns], -1)[None] + 0.1 * torch.randn(1, 128, 120, generator=g)
    lengths = torch.tensor([120])
    batch = {"feats": feats, "feats_lengths": lengths, "text_ids": torch.tensor([[11, 12, 13]]),
             "text_lengths": torch.tensor([3])}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        loss = model(batch)["loss"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.2 * losses[0]
    assert model.eval().transcribe(feats, lengths) == [[11, 12, 13]]


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    blank = 3
    best = torch.tensor([[0, 0, 3, 0, 1, 1, 3, 3, 2, 2]])
    logits = torch.nn.functional.one_hot(best, 4).float()
    assert greedy_ctc(logits, torch.tensor([10]), blank) == [[0, 0, 1, 2]]
    assert greedy_ctc(logits, torch.tensor([5]), blank) == [[0, 0, 1]]


def test_config_errors_name_the_key():
    with pytest.raises(CosyError, match="model.encoder1.input_layer"):
        TokenizerModel(from_dict(TokenizerConfig, tiny_model_dict(input_layer="linear"), "model"))
    bad = tiny_model_dict()
    bad["encoder2"]["input_size"] = 16
    with pytest.raises(CosyError, match="model.encoder2.input_size"):
        TokenizerModel(from_dict(TokenizerConfig, bad, "model"))
    with pytest.raises(CosyError, match="model.quantizer.kind"):
        from_dict(TokenizerConfig, tiny_model_dict(quantizer={"kind": "rvq"}), "model")
    model = tiny_model(max_seconds=0.5)
    with pytest.raises(CosyError, match="50 frames"):
        model.tokenize(*random_feats([51]))
    with pytest.raises(CosyError, match="model.warp.prob"):
        tiny_model(warp={"prob": 2.0})


def test_frequency_warp_changes_training_losses_only():
    feats, lengths = random_feats([90, 61])
    batch = {"feats": feats, "feats_lengths": lengths,
             "text_ids": torch.tensor([[5, 6, 7, 8], [9, 10, -1, -1]]), "text_lengths": torch.tensor([4, 2])}
    plain = tiny_model()  # the same weights in all three
    off, warped = (tiny_model(warp={"prob": p, "max_factor": 1.3}) for p in (0.0, 1.0))

    def loss(model, train):
        torch.manual_seed(1)
        return model.train(train)(batch)["loss"]

    torch.testing.assert_close(loss(warped, False), loss(plain, False))  # validation is never warped
    torch.testing.assert_close(loss(off, True), loss(plain, True))  # prob 0 warps nothing
    assert not torch.allclose(loss(warped, True), loss(plain, True))


def test_speaker_adversary_judges_each_utterance_by_its_mean_token():
    torch.manual_seed(0)
    adversary = SpeakerAdversary(SpeakerAdversaryConfig(weight=2.0, hidden=8), width=6, num_speakers=3)
    tokens = torch.randn(3, 5, 6)
    lengths = torch.tensor([5, 2, 4])
    out = adversary(tokens, lengths_to_mask(lengths, 5), torch.tensor([0, 2, -1]))
    # padding is left out of the mean; the classifier learns from the two known speakers,
    # the confusion loss needs no label and takes all three utterances
    logits = adversary.classifier(torch.stack([tokens[i, :n].mean(0) for i, n in enumerate(lengths)]))
    torch.testing.assert_close(out["adv"], F.cross_entropy(logits[:2], torch.tensor([0, 2])))
    torch.testing.assert_close(out["adv_acc"], (logits[:2].argmax(-1) == torch.tensor([0, 2])).float().mean())
    uniform = torch.full_like(logits, 1 / 3)
    torch.testing.assert_close(out["confusion"], F.kl_div(logits.log_softmax(-1), uniform, reduction="batchmean"))
    # a batch of unknown speakers has a zero classifier loss that still reaches every
    # classifier weight (under DDP an unused parameter stops training)
    unknown = adversary(tokens, lengths_to_mask(lengths, 5), torch.tensor([-1, -1, -1]))["adv"]
    unknown.backward()
    assert unknown == 0 and all(p.grad is not None for p in adversary.classifier.parameters())


def test_speaker_adversary_trains_the_classifier_and_the_tokenizer_on_separate_losses():
    model_dict = tiny_model_dict(quantizer={"kind": "vq", "codebook_size": 16}, adversary={"weight": 0.5, "hidden": 8})
    torch.manual_seed(0)
    model = TokenizerModel(from_dict(TokenizerConfig, model_dict, "model"), num_speakers=2)
    feats, lengths = random_feats([90, 61])
    batch = {"feats": feats, "feats_lengths": lengths, "speakers": torch.tensor([1, 0]),
             "text_ids": torch.tensor([[5, 6, 7, 8], [9, 10, -1, -1]]), "text_lengths": torch.tensor([4, 2])}
    out = model.train()(batch)
    asr = 0.3 * out["ctc"] + 0.7 * out["att"] + out["commit"]
    torch.testing.assert_close(out["loss"], asr + out["adv"] + 0.5 * out["confusion"])
    assert 0 <= out["adv_acc"] <= 1 and out["confusion"] >= 0
    # validation loss is the ASR's alone, so checkpoints are still chosen by it
    evaluated = model.eval()(batch)
    torch.testing.assert_close(evaluated["loss"], 0.3 * evaluated["ctc"] + 0.7 * evaluated["att"] + evaluated["commit"])

    def has_grad(name, module):
        model.zero_grad()
        model(batch)[name].backward()
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    # the classifier's loss moves only the classifier; the confusion loss only the tokenizer
    assert has_grad("adv", model.adversary) and not has_grad("adv", model.encoder1)
    assert has_grad("confusion", model.encoder1) and not has_grad("confusion", model.adversary)


def test_train_init_may_add_or_drop_the_speaker_adversary():
    """Fine-tuning a trained tokenizer with the adversary (or without it) starts from its weights."""
    cfg = from_dict(TokenizerConfig, tiny_model_dict(adversary={"weight": 1.0, "hidden": 8}), "model")
    torch.manual_seed(0)
    plain, with_adversary = TokenizerModel(cfg), TokenizerModel(cfg, num_speakers=3)
    fresh = {k: v.clone() for k, v in with_adversary.state_dict().items() if k.startswith("adversary.")}
    load_weights(with_adversary, plain.state_dict(), "plain.safetensors", optional=TASK.training_only)
    state = with_adversary.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in fresh.items())  # the classifier starts fresh
    load_weights(plain, state, "adversary.safetensors", optional=TASK.training_only)
    with pytest.raises(CosyError, match="missing.*adversary"):
        load_weights(TokenizerModel(cfg, num_speakers=3), plain.state_dict(), "plain.safetensors")


def test_adversary_task_labels_speakers_and_extraction_loads_without_its_list(bpe_path, tmp_path):
    path, vocab = bpe_path
    (tmp_path / "spk2utt").write_text("alice a1\nbob b1\n")
    model_dict = tiny_model_dict(vocab_size=vocab, text_tokenizer=path,
                                 adversary={"weight": 1.0, "speakers": str(tmp_path / "spk2utt")})
    cfg = from_dict(TokenizerConfig, model_dict, "model")
    save_audio(tmp_path / "a.wav", tone(0.5, 300, 0), SR)
    audio = (tmp_path / "a.wav").read_bytes()
    rows = [{"utt": u, "spk": spk, "text": "hello world", "audio": audio} for u, spk in
            [("a", "bob"), ("b", "carol"), ("c", "alice")]]
    steps = TASK.processors(cfg, True)
    batch = TASK.collate([process_row(steps, r) for r in rows])
    assert batch["speakers"].tolist() == [1, -1, 0]  # carol is not a training speaker
    model = TASK.build(cfg)
    assert model.adversary.classifier[-1].out_features == 2
    out = model.train()(batch)
    assert torch.isfinite(out["loss"]) and {"adv", "confusion", "adv_acc"} <= set(out)
    # tokens do not depend on the adversary, and a checkpoint loads after its list is gone
    weights = save_checkpoint(model.eval(), tmp_path / "exp", model_dict)
    (tmp_path / "spk2utt").unlink()
    loaded = load_checkpoint(weights)
    assert loaded.adversary is None
    assert torch.equal(loaded.tokenize(batch["feats"], batch["feats_lengths"])[0],
                       model.tokenize(batch["feats"], batch["feats_lengths"])[0])
    with pytest.raises(CosyError, match="model.adversary.speakers': file not found"):
        TASK.build(cfg)
    with pytest.raises(CosyError, match="model.adversary.weight"):
        TokenizerModel(from_dict(TokenizerConfig, tiny_model_dict(adversary={"weight": -1.0}), "model"))


# ------------------------------------------------------------------------------ whisper


def tiny_whisper(tmp_path):
    cfg = transformers.WhisperConfig(
        num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=40,
        max_target_positions=16, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)
    torch.manual_seed(0)
    whisper = transformers.WhisperModel(cfg).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    return whisper, str(tmp_path / "whisper")


def test_whisper_initialised_encoder_matches_whisper(tmp_path):
    whisper, path = tiny_whisper(tmp_path)
    model_dict = tiny_model_dict(whisper_path=path)
    model = TokenizerModel(from_dict(TokenizerConfig, model_dict, "model")).eval()
    assert model.token_rate == 50
    feats = torch.randn(2, 128, 80)  # Whisper itself only accepts exactly 2 * max_source_positions frames
    with torch.no_grad():
        expected = whisper.encoder(feats).last_hidden_state
        got, lengths = model.encode(feats, torch.tensor([80, 80]))
    assert lengths.tolist() == [40, 40]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # shorter inputs and padded batches work too, and agree with one-by-one
    feats, lengths = random_feats([80, 33])
    tokens, counts = model.tokenize(feats, lengths)
    alone, _ = model.tokenize(feats[1:, :, :33], lengths[1:])
    assert alone[0].equal(tokens[1, :counts[1]])
    # a checkpoint of the whisper-initialised model loads back identically
    ckpt = save_checkpoint(model, tmp_path / "exp", model_dict)
    again = load_checkpoint(ckpt)
    assert again.tokenize(feats, lengths)[0].equal(tokens)
    # the input limit is Whisper's position table (80 frames here), not max_seconds
    assert model.max_frames == 80
    with pytest.raises(CosyError, match="80 frames"):
        model.tokenize(*random_feats([81]))
    # and it exports to ONNX with the same tokens
    onnx_tokens = OnnxBackend(export_onnx(again, tmp_path / "whisper.onnx")).tokenize(feats, lengths)
    for row in range(2):
        np.testing.assert_array_equal(onnx_tokens[row, :counts[row]], tokens[row, :counts[row]].numpy())


def test_whisper_layer_count_is_checked(tmp_path):
    _, path = tiny_whisper(tmp_path)
    with pytest.raises(CosyError, match="whisper_layers"):
        TokenizerModel(from_dict(TokenizerConfig, tiny_model_dict(whisper_path=path, whisper_layers=5), "model"))
    with pytest.raises(CosyError, match="config.json"):
        TokenizerModel(from_dict(TokenizerConfig, tiny_model_dict(whisper_path=str(tmp_path)), "model"))


# ------------------------------------------------------------------- extract and export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VQ tokenizer checkpoint (random weights, a few EMA updates) and its ONNX export."""
    root = tmp_path_factory.mktemp("ckpt")
    model_dict = tiny_model_dict(quantizer={"kind": "vq", "codebook_size": 64, "dead_after": 1}, max_seconds=1.0)
    model = tiny_model(quantizer=model_dict["quantizer"], max_seconds=1.0).train()
    feats, lengths = random_feats([100, 100, 100])
    with torch.no_grad():
        for _ in range(3):  # dead-code re-initialisation spreads the codebook over real encoder outputs
            model.quantizer(model.encode(feats, lengths)[0])
    ckpt = save_checkpoint(model.eval(), root / "exp", model_dict)
    onnx_path = export_onnx(load_checkpoint(ckpt), root / "tokenizer.onnx")
    return ckpt, onnx_path


def test_onnx_tokens_equal_pytorch_tokens(trained, tmp_path):
    ckpt, onnx_path = trained
    model = load_checkpoint(ckpt)
    session = OnnxBackend(onnx_path)
    assert [i.name for i in session.session.get_inputs()] == ["feats", "feats_length"]
    assert session.session.get_outputs()[0].name == "indices"
    assert session.rate_factor == 2
    data = make_data_dir(tmp_path, durations=(0.9, 0.4, 0.75))
    mel = WhisperMelConfig()
    waves = [torch.from_numpy(sf.read(data.wav[u], dtype="float32")[0]) for u in data.utts]
    lengths = torch.tensor([len(w) for w in waves])
    wave = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    feats = whisper_log_mel(wave, mel, lengths)
    frames = lengths // mel.hop_length
    expected, counts = model.tokenize(feats, frames)
    got = session.tokenize(feats, frames)
    assert got.shape == (3, math.ceil(feats.shape[-1] / 2))
    for row in range(3):
        np.testing.assert_array_equal(got[row, :counts[row]], expected[row, :counts[row]].numpy())


def test_conv1d_front_exports_to_onnx_with_the_same_tokens(tmp_path):
    model = tiny_model(input_layer="conv1d4", quantizer={"kind": "vq", "codebook_size": 64})
    feats, lengths = random_feats([97, 40, 13])
    expected, counts = model.tokenize(feats, lengths)
    session = OnnxBackend(export_onnx(model, tmp_path / "conv1d.onnx"))
    assert session.rate_factor == 4
    got = session.tokenize(feats, lengths)
    for row in range(3):
        np.testing.assert_array_equal(got[row, :counts[row]], expected[row, :counts[row]].numpy())


def test_whitened_fsq_exports_to_onnx_with_the_same_tokens(tmp_path):
    model = tiny_model(input_layer="conv1d2", quantizer={"kind": "fsq", "levels": [3, 3, 3, 3], "whiten": True})
    torch.manual_seed(1)
    with torch.no_grad():  # a whitening estimate that rotates and scales, as after training
        model.quantizer.running_mean.copy_(0.1 * torch.randn(4))
        model.quantizer.whitening.copy_(torch.eye(4) + 0.5 * torch.randn(4, 4).tril())
    feats, lengths = random_feats([97, 40, 13])
    expected, counts = model.tokenize(feats, lengths)
    got = OnnxBackend(export_onnx(model, tmp_path / "whitened.onnx")).tokenize(feats, lengths)
    for row in range(3):
        np.testing.assert_array_equal(got[row, :counts[row]], expected[row, :counts[row]].numpy())


def test_extract_batched_equals_one_by_one_and_skips_bad_audio(trained, tmp_path, caplog):
    ckpt, onnx_path = trained
    # 2.1 s exceeds this model's max_seconds of 1.0: it is tokenized in windows
    data = make_data_dir(tmp_path, durations=(0.5, 1.3, 0.8, 2.1, 0.3, 1.0))
    (tmp_path / "wavs" / "bad.wav").write_bytes(b"RIFF this is not audio")
    save_audio(tmp_path / "wavs" / "empty.wav", np.zeros(0, dtype=np.float32), SR)
    data.wav.update({"spk0_bad": str(tmp_path / "wavs" / "bad.wav"),
                     "spk1_empty": str(tmp_path / "wavs" / "empty.wav")})
    data.text.update({"spk0_bad": "x", "spk1_empty": "y"})
    data.utt2spk.update({"spk0_bad": "spk0", "spk1_empty": "spk1"})
    data.save(tmp_path)

    backend = TorchBackend(load_checkpoint(ckpt))
    with caplog.at_level(logging.WARNING):
        batched, skipped = extract(tmp_path, backend, batch_size=4)
    assert sorted(u for u, _ in skipped) == ["spk0_bad", "spk1_empty"]
    assert "spk0_bad" in caplog.text and "spk1_empty" in caplog.text
    single, _ = extract(tmp_path, backend, batch_size=1)
    onnx_tokens, _ = extract(tmp_path, OnnxBackend(onnx_path), batch_size=3)
    assert sorted(batched) == sorted(single) == sorted(onnx_tokens) == [u for u in DataDir.load(tmp_path).utts
                                                                        if u not in ("spk0_bad", "spk1_empty")]
    for utt in batched:
        frames = sf.info(data.wav[utt]).frames // 160
        assert batched[utt].dtype == np.int32 and len(batched[utt]) == math.ceil(frames / 2)
        np.testing.assert_array_equal(batched[utt], single[utt])
        np.testing.assert_array_equal(batched[utt], onnx_tokens[utt])
    # the long utterance = its 1 s windows tokenized separately
    long_utt = "spk1_utt03"
    wave = torch.from_numpy(sf.read(data.wav[long_utt], dtype="float32")[0])[None]
    feats = whisper_log_mel(wave, WhisperMelConfig())
    pieces = [backend.tokenize(feats[:, :, s:s + 100], torch.tensor([feats[:, :, s:s + 100].shape[-1]]))[0]
              for s in range(0, feats.shape[-1], 100)]
    np.testing.assert_array_equal(batched[long_utt], np.concatenate(pieces))


def test_extract_cli_writes_int32_tokens_and_merges_parts(trained, tmp_path):
    ckpt, _ = trained
    make_data_dir(tmp_path, durations=(0.5, 0.7, 0.6))
    assert cli_main(["extract", "tokens", "--data", str(tmp_path), "--tokenizer", str(ckpt), "--batch-size", "2",
                     "--num-workers", "2"]) == 0
    written = load_file(str(tmp_path / "utt2speech_token.safetensors"))
    assert sorted(written) == DataDir.load(tmp_path).utts
    # utt00 0.5 s, utt01 0.7 s, utt02 0.6 s -> 50, 70, 60 frames -> 25, 35, 30 tokens at 50 Hz
    assert {u[-2:]: len(v) for u, v in written.items()} == {"00": 25, "01": 35, "02": 30}
    assert all(v.dtype == np.int32 and v.ndim == 1 for v in written.values())
    # torchrun-style parts: each rank's share, merged by rank 0
    backend = TorchBackend(load_checkpoint(ckpt))
    for rank in range(2):
        part, _ = extract(tmp_path, backend, rank=rank, world_size=2)
        save_tokens(tmp_path / f"utt2speech_token.safetensors.part{rank}", part)
    (tmp_path / "utt2speech_token.safetensors").unlink()
    merge_parts(tmp_path, 2)
    merged = load_file(str(tmp_path / "utt2speech_token.safetensors"))
    assert sorted(merged) == sorted(written)
    for utt in written:
        np.testing.assert_array_equal(merged[utt], written[utt])
    assert not list(tmp_path.glob("*.part*"))


def test_cli_errors_name_the_file(tmp_path, capsys):
    make_data_dir(tmp_path, durations=(0.5,))
    assert cli_main(["extract", "tokens", "--data", str(tmp_path), "--tokenizer", str(tmp_path / "nope.onnx")]) == 1
    assert "nope.onnx" in capsys.readouterr().err
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert cli_main(["export", "tokenizer", str(tmp_path / "w.safetensors"), "--onnx", str(tmp_path / "o.onnx")]) == 1
    assert "config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"task": "tokenizer", "model": tiny_model_dict()}))
    assert cli_main(["export", "tokenizer", str(tmp_path / "w.safetensors"), "--onnx", str(tmp_path / "o.onnx")]) == 1
    assert "cannot read checkpoint" in (err := capsys.readouterr().err) and "w.safetensors" in err
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"task": "flow", "model": {}}))
    assert cli_main(["export", "tokenizer", str(tmp_path / "w.safetensors"), "--onnx", str(tmp_path / "o.onnx")]) == 1
    assert "not 'tokenizer'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- task


def test_task_processors_and_collate(bpe_path, tmp_path):
    path, vocab = bpe_path
    cfg = from_dict(TokenizerConfig, tiny_model_dict(vocab_size=vocab, text_tokenizer=path), "model")
    save_audio(tmp_path / "a.wav", tone(0.5, 300, 0, 22050), 22050)  # resampled to 16 kHz by the processor
    rows = [{"utt": "a", "text": "hello world", "audio": (tmp_path / "a.wav").read_bytes()},
            {"utt": "b", "text": "number one", "audio": b"garbage"},
            {"utt": "c", "text": "two", "audio": (tmp_path / "a.wav").read_bytes()}]
    steps = TASK.processors(cfg, True)
    out = [row for row in (process_row(steps, r) for r in rows) if row is not None]
    assert [r["utt"] for r in out] == ["a", "c"]
    assert out[0]["feats"].shape == (128, 50) and TASK.num_frames(out[0]) == 50
    assert TextTokenizer.load(path).decode(out[0]["text_ids"].tolist()) == "hello world"
    batch = TASK.collate(out)
    assert batch["feats"].shape == (2, 128, 50)
    assert batch["text_lengths"].tolist() == [len(out[0]["text_ids"]), len(out[1]["text_ids"])]
    assert (batch["text_ids"][1, batch["text_lengths"][1]:] == -1).all()
    model = TASK.build(cfg)
    assert torch.isfinite(model(batch)["loss"])


def test_vocab_size_is_checked_against_the_text_tokenizer(bpe_path):
    path, vocab = bpe_path
    cfg = from_dict(TokenizerConfig, tiny_model_dict(vocab_size=vocab + 1, text_tokenizer=path), "model")
    with pytest.raises(CosyError, match="model.vocab_size"):
        TASK.processors(cfg, True)


# ------------------------------------------------------------------------------ evaluate


def test_speaker_split_alternates_and_drops_single_utterance_speakers():
    utt2spk = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "c1": "C"}
    assert speaker_split(utt2spk) == (["a1", "a3", "b1"], ["a2", "b2"])


def test_nearest_centroid_accuracy_separable_and_uninformative():
    rng = np.random.default_rng(0)
    centres = {s: rng.normal(size=16) * 5 for s in "ABCD"}
    utt2spk = {f"{s}{i}": s for s in "ABCD" for i in range(6)}
    separable = {u: centres[s] + rng.normal(size=16) * 0.1 for u, s in utt2spk.items()}
    result = nearest_centroid_accuracy(separable, utt2spk)
    assert result["accuracy"] == 1.0 and result["chance"] == 0.25 and result["test_utterances"] == 12
    # identical vectors carry no identity: every test utterance goes to the first speaker
    same = {u: np.ones(16) for u in utt2spk}
    assert nearest_centroid_accuracy(same, utt2spk)["accuracy"] == 0.25
    # one utterance per speaker: nothing to test on
    assert nearest_centroid_accuracy({"a": np.ones(2), "b": np.ones(2)}, {"a": "A", "b": "B"}) is None


@pytest.fixture(scope="module")
def eval_checkpoint(bpe_path, tmp_path_factory):
    path, vocab = bpe_path
    model_dict = tiny_model_dict(vocab_size=vocab, text_tokenizer=path,
                                 quantizer={"kind": "vq", "codebook_size": 32, "dead_after": 1})
    torch.manual_seed(0)
    model = TokenizerModel(from_dict(TokenizerConfig, model_dict, "model")).train()
    feats, lengths = random_feats([100, 100])
    with torch.no_grad():
        for _ in range(2):
            model.quantizer(model.encode(feats, lengths)[0])
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("eval") / "exp", model_dict)


def test_eval_tokenizer_cli_reports_every_metric(eval_checkpoint, tmp_path, capsys):
    data_dir = tmp_path / "data"
    make_data_dir(data_dir, durations=(0.5, 0.6, 0.7, 0.8, 0.5, 0.6, 0.7, 0.8))
    out = tmp_path / "reports" / "tok.v2"  # a folder that does not exist yet; a dot in the prefix
    assert cli_main(["eval", "tokenizer", "--data", str(data_dir), "--tokenizer", str(eval_checkpoint),
                     "--out", str(out), "--batch-size", "3"]) == 0
    report = json.loads((tmp_path / "reports" / "tok.v2.json").read_text())
    assert report["utterances"] == 8 and report["skipped"] == []
    assert report["audio_seconds"] == pytest.approx(5.2, abs=1e-9)
    assert report["asr"]["utterances"] == 8 and report["asr"]["wer"] >= 0 and report["asr"]["cer"] >= 0
    tok = report["tokens"]
    assert tok["count"] == 5.2 * 50 and tok["per_second"] == pytest.approx(50.0)
    book = tok["codebook"]
    assert tok["codebook_size"] == 32 and 0 < book["used_fraction"] <= 1
    assert book["perplexity"] == pytest.approx(2 ** book["entropy_bits"])
    leak = tok["speaker_leakage"]
    assert leak["tokens"]["chance"] == 0.5 and leak["tokens"]["test_utterances"] == 4
    # the two "speakers" are tones an octave apart: pooled log-mel separates them perfectly
    assert leak["log_mel"]["accuracy"] == 1.0
    markdown = (tmp_path / "reports" / "tok.v2.md").read_text()
    assert "| WER (greedy CTC) |" in markdown and markdown in capsys.readouterr().out


def test_eval_tokenizer_without_quantizer_reports_asr_only(bpe_path, tmp_path):
    path, vocab = bpe_path
    model_dict = tiny_model_dict(vocab_size=vocab, text_tokenizer=path, quantizer={"kind": "none"})
    ckpt = save_checkpoint(tiny_model(**{k: model_dict[k] for k in ("vocab_size", "text_tokenizer", "quantizer")}),
                           tmp_path / "exp", model_dict)
    make_data_dir(tmp_path / "data", durations=(0.5, 0.6))
    report = evaluate(tmp_path / "data", TorchBackend(load_checkpoint(ckpt)))
    assert report["tokens"] is None and report["asr"]["utterances"] == 2
    assert "quantizer kind 'none'" in format_markdown(report)
    with pytest.raises(CosyError, match="'none'"):
        extract(tmp_path / "data", TorchBackend(load_checkpoint(ckpt)))


def test_eval_tokenizer_with_onnx_has_no_asr(trained, tmp_path):
    _, onnx_path = trained
    make_data_dir(tmp_path, durations=(0.5, 0.6, 0.7, 0.8))
    report = evaluate(tmp_path, OnnxBackend(onnx_path), codebook_size=64)
    assert report["asr"] is None and report["tokens"]["codebook_size"] == 64
    assert "no ASR head" in format_markdown(report)
    with pytest.raises(CosyError, match="codebook-size"):
        evaluate(tmp_path, OnnxBackend(onnx_path), codebook_size=1)


@pytest.mark.parametrize("name,factor,codes", [("tokenizer_tiny", 2, 512), ("tokenizer_fsq", 4, 3 ** 8)])
def test_recipe_configs_build(name, factor, codes, bpe_path):
    path, vocab = bpe_path
    conf = Path(__file__).parent.parent / "recipes" / "mini" / "conf" / f"{name}.yaml"
    data = yaml.safe_load(conf.read_text())
    assert data["task"] == "tokenizer"
    cfg = from_dict(TokenizerConfig, {**data["model"], "text_tokenizer": path, "vocab_size": vocab}, "model")
    model = TASK.build(cfg)
    assert model.rate_factor == factor and model.quantizer.codebook_size == codes
