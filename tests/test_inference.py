"""Model dirs, `cosy pack`, `cosy synthesize`, `cosy vc`, CosyTTS, streaming, `cosy bench`, `cosy serve`.

Every test uses one tiny randomly initialised system packed once per session.
"""

import json
import re
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from cosy.bench import synthetic_prompt, write_random_experiments, write_text_tokenizer
from cosy.cli import main as cli_main
from cosy.errors import CosyError
from cosy.inference import CosyTTS, pack
from cosy.inference.model_dir import PARTS, resolve_source
from cosy.inference.pipeline import encode_prompt_text
from cosy.train.checkpoint import Entry

TEXT = "Hello there, this is a small test of the speech system."
HOP = 256
RATE = 22050


@pytest.fixture(scope="session")
def system(tmp_path_factory):
    root = tmp_path_factory.mktemp("system")
    dirs = write_random_experiments(root / "exp", "tiny")
    tokenizer = write_text_tokenizer(root / "tokenizer.json")
    model_dir = pack(dirs, tokenizer, root / "model")
    samples, rate = synthetic_prompt(3.0)
    prompt = root / "prompt.wav"
    sf.write(prompt, samples, rate)
    return {"root": root, "dirs": dirs, "tokenizer": tokenizer, "model": model_dir, "prompt": prompt,
            "tts": CosyTTS.from_pretrained(model_dir)}


def cli(*args):
    return cli_main([str(a) for a in args])


def audio_bounds(tts, text):
    """Shortest and longest output (seconds) the LM's length limits allow for `text`."""
    lengths = [len(ids) for ids in tts.sentences(text)]
    cfg = tts.parts.llm.cfg
    pauses = (len(lengths) - 1) * tts.settings.pause_seconds
    per_token = 1 / tts.parts.flow.cfg.token_rate
    low = sum(math.floor(n * cfg.min_token_text_ratio) for n in lengths) * per_token + pauses
    high = sum(math.floor(n * cfg.max_token_text_ratio) for n in lengths) * per_token + pauses
    return low - 0.05, high + 0.05


# ---------------------------------------------------------------------------- pack / load


def test_pack_writes_every_part_and_manifest(system):
    model = system["model"]
    config = yaml.safe_load((model / "config.yaml").read_text())
    for part in PARTS:
        assert (model / config[part]).is_file()
        assert yaml.safe_load((model / part / "config.yaml").read_text())["task"] == part
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["sample_rate"] == RATE and manifest["token_rate"] == 50.0
    assert manifest["mel"]["hop_length"] == HOP and manifest["speech_vocab"] == 64
    assert manifest["sources"]["llm"] == str((system["dirs"]["llm"] / "model.safetensors").resolve())
    # the vocoder's discriminator is a training-only part and is not carried over
    from safetensors.torch import load_file
    assert not any(k.startswith("discriminator") for k in load_file(model / "vocoder/model.safetensors"))


def test_pack_takes_the_best_indexed_checkpoint(system, tmp_path):
    exp = tmp_path / "llm"
    shutil.copytree(system["dirs"]["llm"], exp)
    weights = (exp / "model.safetensors").read_bytes()
    (exp / "model.safetensors").unlink()
    for step in (10, 20, 30):
        (exp / f"step_{step}.safetensors").write_bytes(weights)
    index = [{"step": 10, "epoch": 0, "cv_loss": 3.0}, {"step": 20, "epoch": 1, "cv_loss": 2.0},
             {"step": 30, "epoch": 2, "cv_loss": 2.5}]
    (exp / "checkpoints.yaml").write_text(yaml.safe_dump(index))
    assert resolve_source("llm", exp) == (exp / Entry(20, 1, 2.0).weights, exp / "config.yaml")
    (exp / "model.safetensors").write_bytes(weights)  # what `cosy average --out` writes wins
    assert resolve_source("llm", exp)[0] == exp / "model.safetensors"


def test_pack_leaves_out_the_tokenizer_speaker_adversary(system, tmp_path):
    from safetensors.torch import load_file, save_file
    exp = tmp_path / "tokenizer"
    shutil.copytree(system["dirs"]["tokenizer"], exp)
    config = yaml.safe_load((exp / "config.yaml").read_text())
    config["model"]["adversary"] = {"weight": 1.0, "speakers": str(tmp_path / "gone" / "spk2utt"), "hidden": 4}
    (exp / "config.yaml").write_text(yaml.safe_dump(config))
    state = load_file(exp / "model.safetensors")
    width = config["model"]["encoder1"]["d_model"]
    save_file({**state, "adversary.classifier.0.weight": torch.zeros(4, width), "adversary.classifier.0.bias": torch.zeros(4),
               "adversary.classifier.2.weight": torch.zeros(2, 4), "adversary.classifier.2.bias": torch.zeros(2)},
              exp / "model.safetensors")
    model = pack({**system["dirs"], "tokenizer": exp}, system["tokenizer"], tmp_path / "model")
    assert load_file(model / "tokenizer" / "model.safetensors").keys() == state.keys()
    assert "adversary" not in yaml.safe_load((model / "tokenizer" / "config.yaml").read_text())["model"]
    assert CosyTTS.from_pretrained(model).parts.tokenizer is not None


def test_pack_half_stores_float16_and_loads_as_float32(system, tmp_path):
    from safetensors.torch import load_file
    model = pack(system["dirs"], system["tokenizer"], tmp_path / "half", half=True)
    for part in ("llm", "flow", "vocoder"):
        half = load_file(model / part / "model.safetensors")
        full = load_file(system["model"] / part / "model.safetensors")
        assert half.keys() == full.keys()
        assert all(half[k].dtype == (torch.float16 if full[k].is_floating_point() else full[k].dtype) for k in full)
    tts = CosyTTS.from_pretrained(model)
    for part in ("llm", "flow", "vocoder"):
        params = dict(getattr(tts.parts, part).named_parameters())
        reference = dict(getattr(system["tts"].parts, part).named_parameters())
        for name, value in params.items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, reference[name], rtol=1e-3, atol=1e-4)
    # a waveform from the same mel differs only by float16 rounding of the weights
    mel = torch.randn(1, tts.parts.vocoder.mel.n_mels, 40)
    with torch.no_grad():
        torch.manual_seed(0)  # the vocoder's sine source draws its phase and noise
        half_wave = tts.parts.vocoder(mel, torch.tensor([40]))[0]
        torch.manual_seed(0)
        full_wave = system["tts"].parts.vocoder(mel, torch.tensor([40]))[0]
    assert (half_wave - full_wave).abs().max() < 0.01 * full_wave.abs().max()


@pytest.mark.parametrize("part, override, message", [
    ("llm", {"speech_vocab": 32}, "speech tokenizer has 64 codes but the LLM"),
    ("flow", {"spk_dim": 32}, "the flow decoder (flow/config.yaml model.spk_dim) expects 32"),
    ("vocoder", {"mel": {"fmax": 7600.0}}, "vocoder's mel settings (vocoder/config.yaml model.mel) differ from the "
                                           "flow decoder's in fmax"),
    ("llm", {"text_vocab": 280}, "the text tokenizer has 300 tokens but the LLM"),
])
def test_pack_names_the_part_that_does_not_fit(system, tmp_path, part, override, message):
    dirs = dict(system["dirs"])
    dirs.update(write_random_experiments(tmp_path / "exp", "tiny", overrides={part: override}, parts=(part,)))
    with pytest.raises(CosyError) as err:
        pack(dirs, system["tokenizer"], tmp_path / "model")
    assert message in str(err.value)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.*"))


def test_pack_cli_errors(system, tmp_path, capsys):
    args = [f"--{p}={system['dirs'][p]}" for p in PARTS]
    assert cli("pack", *args, "--text-tokenizer", system["tokenizer"], "--out", system["model"]) == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
    bad = [a if not a.startswith("--flow") else f"--flow={tmp_path / 'nothing'}" for a in args]
    assert cli("pack", *bad, "--text-tokenizer", system["tokenizer"], "--out", tmp_path / "m") == 1
    err = capsys.readouterr().err
    assert "--flow" in err and "no such file or directory" in err
    onnx = tmp_path / "llm.onnx"
    onnx.write_bytes(b"x")
    bad = [a if not a.startswith("--llm") else f"--llm={onnx}" for a in args]
    assert cli("pack", *bad, "--text-tokenizer", system["tokenizer"], "--out", tmp_path / "m") == 1
    assert "only the tokenizer and speaker encoder may be ONNX" in capsys.readouterr().err
    assert cli("pack", *args, "--text-tokenizer", system["tokenizer"], "--out", tmp_path / "m",
               "--synthesis", "speed=2") == 1
    assert "speed" in capsys.readouterr().err
    assert cli("pack", *args, "--text-tokenizer", system["tokenizer"], "--out", tmp_path / "m",
               "--synthesis", "prompt_warp_semitones=-1") == 1
    assert "synthesis.prompt_warp_semitones must be 0 or in [0.2, 12], got -1" in capsys.readouterr().err
    assert cli("pack", *args, "--text-tokenizer", system["tokenizer"], "--out", tmp_path / "m",
               "--synthesis", "prompt_warp_semitones") == 1
    assert "--synthesis prompt_warp_semitones: expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert cli("pack", *args, "--text-tokenizer", system["tokenizer"], "--out", tmp_path / "m",
               "--synthesis", "prompt_warp_semitones=4", "batch_size=2") == 0
    synthesis = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())["synthesis"]
    assert synthesis["prompt_warp_semitones"] == 4 and synthesis["batch_size"] == 2


# ---------------------------------------------------------------------------- synthesis


def test_synthesize_cli_writes_a_wav_of_plausible_length(system, tmp_path):
    out = tmp_path / "out.wav"
    assert cli("synthesize", "--text", TEXT, "--prompt-wav", system["prompt"], "--model-dir", system["model"],
               "--out", out, "--seed", 1) == 0
    wave, rate = sf.read(out)
    low, high = audio_bounds(system["tts"], TEXT)
    assert rate == RATE and wave.ndim == 1
    assert low <= len(wave) / rate <= high
    assert len(wave) % HOP == 0 and np.abs(wave).max() > 0


def test_stream_gives_the_offline_length_and_seed_fixes_samples(system, tmp_path):
    common = ["--text", TEXT, "--prompt-wav", system["prompt"], "--model-dir", system["model"], "--seed", 7]
    for name, extra in (("a", []), ("b", []), ("s", ["--stream"])):
        assert cli("synthesize", *common, "--out", tmp_path / f"{name}.wav", *extra) == 0
    a, b, s = (sf.read(tmp_path / f"{n}.wav", dtype="int16")[0] for n in "abs")
    assert np.array_equal(a, b)
    assert len(s) == len(a)
    c, _ = system["tts"].synthesize(TEXT, system["prompt"], seed=8)
    assert not np.array_equal(c[:len(a)] if len(c) >= len(a) else c, a[:len(c)] / 32768.0)


def test_prompt_warp_reaches_the_vocoder_offline_and_streaming(system, monkeypatch):
    from dataclasses import replace

    import cosy.inference.pipeline as pipeline
    import cosy.inference.streaming as streaming
    from cosy.audio import warp_mel

    tts = system["tts"]
    flow, vocoder = tts.parts.flow, tts.parts.vocoder
    decoded, vocoded, estimates = [], [], []
    inference, forward = flow.inference, vocoder.forward
    monkeypatch.setattr(flow, "inference", lambda *a, **k: decoded.append(inference(*a, **k)) or decoded[-1])
    monkeypatch.setattr(vocoder, "forward", lambda mel, *a, **k: vocoded.append(mel) or forward(mel, *a, **k))
    for module in (pipeline, streaming):
        monkeypatch.setattr(module, "matching_warp", lambda mel, ref, cfg, limit: estimates.append(limit) or 1.1)
    monkeypatch.setattr(tts, "settings", replace(tts.settings, prompt_warp_semitones=3.0))
    prompt = tts.prompt(system["prompt"])
    tts.synthesize("A short one.", prompt, seed=0)
    assert estimates == [3.0]
    torch.testing.assert_close(vocoded[0], warp_mel(decoded[0], torch.tensor([1.1]), flow.cfg.mel))
    estimates.clear()
    warped, pushed = [], []
    monkeypatch.setattr(streaming, "warp_mel", lambda mel, f, cfg: warped.append(warp_mel(mel, f, cfg)) or warped[-1])
    push = streaming.StreamingVocoder.push
    monkeypatch.setattr(streaming.StreamingVocoder, "push", lambda self, mel: pushed.append(mel) or push(self, mel))
    list(tts.stream(TEXT, prompt, seed=0))
    assert estimates == [3.0]  # the first chunk fixes the factor for the rest
    assert len(pushed) > 1 and len(pushed) == len(warped)
    assert all(p is w for p, w in zip(pushed, warped))  # every chunk the vocoder gets is a warped one
    monkeypatch.setattr(tts, "settings", replace(tts.settings, prompt_warp_semitones=0.0))
    decoded.clear(), vocoded.clear(), estimates.clear()
    tts.synthesize("A short one.", prompt, seed=0)
    assert estimates == [] and torch.equal(vocoded[0], decoded[0])


def test_vocoder_fitted_to_the_prompt_speaks_for_it_offline_and_streaming(system, monkeypatch):
    from dataclasses import replace

    import cosy.inference.streaming as streaming
    import cosy.vocoder.adapt as adapt

    tts = system["tts"]
    fits, streamed = [], []
    fit = adapt.fit_to_recording
    monkeypatch.setattr(adapt, "fit_to_recording",
                        lambda gen, cfg, wave, steps, lr: fits.append((gen, len(wave), steps, lr)) or
                        fit(gen, cfg, wave, steps, lr))
    plain = tts.prompt(system["prompt"])
    monkeypatch.setattr(tts, "settings", replace(tts.settings, vocoder_adapt_steps=3, vocoder_adapt_lr=1e-3))
    fitted = tts.prompt(system["prompt"])
    assert plain.vocoder is None and fits == [(tts.parts.vocoder, 3 * RATE, 3, 1e-3)]
    assert fitted.vocoder is not None and fitted.vocoder is not tts.parts.vocoder
    # the prompts differ only in their vocoder: same seed, same length, other samples
    a, b = (tts.synthesize("A short one.", p, seed=0)[0] for p in (plain, fitted))
    assert len(a) == len(b) and not np.array_equal(a, b)
    vocoded = []
    for name, vocoder in (("model", tts.parts.vocoder), ("fitted", fitted.vocoder)):
        forward = vocoder.forward
        monkeypatch.setattr(vocoder, "forward", lambda mel, *x, name=name, forward=forward, **k:
                            vocoded.append((name, mel.shape[0])) or forward(mel, *x, **k))
    both = tts.synthesize_batch(["A short one.", "A short one."], [plain, fitted], seed=0)
    assert sorted(vocoded) == [("fitted", 1), ("model", 1)] and all(len(w) for w in both)
    init = streaming.StreamingVocoder.__init__
    monkeypatch.setattr(streaming.StreamingVocoder, "__init__",
                        lambda self, gen, *x, **k: streamed.append(gen) or init(self, gen, *x, **k))
    list(tts.stream("A short one.", fitted, seed=0))
    assert streamed == [fitted.vocoder]
    assert len(fits) == 1  # a Prompt carries its vocoder: it is not fitted again
    wave, _ = tts.convert(system["prompt"], system["prompt"], seed=0)  # fitted under convert's inference mode
    assert len(fits) == 2 and len(wave) > 0


def test_synthesize_cli_sets_the_vocoder_adaptation(system, tmp_path, capsys, monkeypatch):
    import cosy.vocoder.adapt as adapt

    steps = []
    fit = adapt.fit_to_recording
    monkeypatch.setattr(adapt, "fit_to_recording",
                        lambda gen, cfg, wave, n, lr: steps.append(n) or fit(gen, cfg, wave, n, lr))
    common = ["--text", "A short one.", "--prompt-wav", system["prompt"], "--model-dir", system["model"],
              "--out", tmp_path / "a.wav", "--seed", 0]
    assert cli("synthesize", *common, "--vocoder-adapt-steps", -1) == 1
    assert "--vocoder-adapt-steps must be at least 0, got -1" in capsys.readouterr().err
    assert cli("synthesize", *common) == 0 and steps == []  # the model dir's setting: off
    assert cli("synthesize", *common, "--vocoder-adapt-steps", 2) == 0 and steps == [2]


def test_first_stream_chunk_comes_before_the_lm_finishes(system, monkeypatch):
    import cosy.llm.decode as decode

    original, state = decode.stream, {"finished": False}

    def watched(*args, **kwargs):
        yield from original(*args, **kwargs)
        state["finished"] = True

    monkeypatch.setattr(decode, "stream", watched)
    tts = system["tts"]
    chunks = tts.stream(TEXT + " " + TEXT, system["prompt"], seed=3)
    first = next(chunks)
    assert len(first) > 0 and not state["finished"]
    rest = list(chunks)
    assert state["finished"] and rest


def test_long_text_is_split_and_joined_with_pauses(system):
    tts = system["tts"]
    text = "This is the first sentence of the test. Here comes the second sentence, a bit longer."
    assert len(tts.sentences(text)) == 2
    wave, rate = tts.synthesize(text, system["prompt"], seed=2)
    low, high = audio_bounds(tts, text)
    assert low <= len(wave) / rate <= high
    assert wave.dtype == np.float32


def test_prompt_text_prefixes_the_lm(system):
    tts = system["tts"]
    with_text = tts.prompt(system["prompt"], "A prompt recording says hello.")
    assert with_text.text and len(with_text.tokens) > 0
    inputs = tts._lm_inputs(tts.sentences(TEXT), [with_text])
    assert int(inputs["prompt_speech_len"][0]) == len(with_text.tokens)
    assert int(inputs["prompt_text_len"][0]) == len(with_text.text)
    plain = tts._lm_inputs(tts.sentences(TEXT), [tts.prompt(system["prompt"])])
    assert int(plain["prompt_speech_len"][0]) == 0 and int(plain["prompt_text_len"][0]) == 0
    wave, _ = tts.synthesize(TEXT, system["prompt"], "A prompt recording says hello.", seed=0)
    assert len(wave) > 0


def test_prompt_text_the_tokenizer_cannot_encode_is_dropped_with_a_warning():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from cosy.text.bpe import TextTokenizer
    from cosy.text.symbols import UNK

    words = Tokenizer(models.WordLevel({UNK: 0, "hello": 1, "world": 2}, unk_token=UNK))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = TextTokenizer(words)
    assert encode_prompt_text(tokenizer, "hello world", "en", 10) == [1, 2]
    with pytest.warns(UserWarning, match="cannot encode the prompt text"):
        assert encode_prompt_text(tokenizer, "hello Здравствуйте", "en", 10) == []
    with pytest.warns(UserWarning, match="cannot encode"):
        assert encode_prompt_text(tokenizer, "hello world", "en", 2) == []  # id 2 beyond the LM's table


def test_stereo_prompt_at_any_rate_and_long_prompt_trimmed(system):
    tts = system["tts"]
    samples, rate = synthetic_prompt(2.0, 44100)
    stereo = np.stack([samples, 0.5 * samples], axis=1)
    prompt = tts.prompt((stereo, rate))
    frames_per_second = RATE / HOP
    # alignment to whole speech tokens may crop up to two tokens (3.4 frames)
    assert abs(prompt.mel.shape[1] - 2.0 * frames_per_second) <= 4
    long, rate = synthetic_prompt(31.0, 8000)
    with pytest.warns(UserWarning, match="using its first 30 s"):
        trimmed = tts.prompt((long, rate))
    assert abs(trimmed.mel.shape[1] - 30.0 * frames_per_second) <= 4


def _bad_prompts(tmp_path):
    short, rate = synthetic_prompt(0.5)
    sf.write(tmp_path / "short.wav", short, rate)
    sf.write(tmp_path / "silent.wav", np.zeros(3 * rate, dtype=np.float32), rate)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    poisoned, rate = synthetic_prompt(2.0)
    poisoned[100] = np.nan
    sf.write(tmp_path / "nan.wav", poisoned, rate, subtype="FLOAT")
    (tmp_path / "notes.txt").write_text("this is not audio\n")
    return {
        "missing": (tmp_path / "missing.wav", "audio file not found"),
        "corrupt": (tmp_path / "corrupt.wav", "cannot read audio"),
        "not audio": (tmp_path / "notes.txt", "cannot read audio"),
        "silent": (tmp_path / "silent.wav", "is silent"),
        "nan": (tmp_path / "nan.wav", "has NaN or infinite samples"),
        "short": (tmp_path / "short.wav", "0.50 s long; it must be at least 1 s"),
    }


def test_bad_input_gives_a_specific_message_and_exit_code(system, tmp_path, capsys):
    base = ["--model-dir", system["model"], "--out", tmp_path / "x.wav"]
    cases = [(["--text", "   \t ", "--prompt-wav", system["prompt"]], "text is empty"),
             (["--text", "?! ... -- !", "--prompt-wav", system["prompt"]], "nothing speakable after normalisation")]
    for name, (path, message) in _bad_prompts(tmp_path).items():
        cases.append((["--text", TEXT, "--prompt-wav", path], message))
    cases.append((["--text", TEXT, "--prompt-wav", tmp_path / "silent.wav", "--stream"], "is silent"))
    good = ["--text", TEXT, "--prompt-wav", system["prompt"]]
    cases += [(good + ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
              (good + ["--device", "gpu"], "device 'gpu' is not a torch device"),
              (good + ["--seed", str(2**64)], "seed must be between 0 and 2**63 - 1")]
    if not torch.cuda.is_available():
        cases.append((good + ["--device", "cuda"], "device 'cuda': this torch sees no CUDA device"))
    for args, message in cases:
        assert cli("synthesize", *args, *base) == 1, message
        err = capsys.readouterr().err
        assert message in err and err.startswith("cosy synthesize: error:"), (message, err)
    assert not (tmp_path / "x.wav").exists()
    for out in ("x", "x.ogg"):  # refused before any synthesis, not after it
        assert cli("synthesize", *good, "--model-dir", system["model"], "--out", tmp_path / out) == 1
        assert f"--out {tmp_path / out}: the extension must name a 16-bit PCM audio format" in capsys.readouterr().err


def test_sentences_are_cut_to_fit_the_lm_beside_the_prompt_text(system, monkeypatch):
    from dataclasses import replace

    tts = system["tts"]
    limit = 40
    monkeypatch.setattr(tts.parts.llm, "cfg", replace(tts.parts.llm.cfg, max_text_len=limit))
    prompt = tts.prompt(system["prompt"], "Hello there.")
    # 78 characters; the spelt-out number makes it far more text tokens than the LM takes
    text = "Call me on 5551234567 or at home, whenever you like, and we will talk about it."
    alone = tts.sentences(text)
    pieces = tts.sentences(text, len(prompt.text))
    assert all(1 <= len(p) <= limit for p in alone)
    assert len(pieces) > len(alone) > 1 and all(1 <= len(p) <= limit - len(prompt.text) for p in pieces)
    wave, _ = tts.synthesize(text, prompt, seed=0)  # the LM's own check is never reached
    assert len(wave) > 0
    assert sum(map(len, tts.stream(text, prompt, seed=0))) > 0
    with pytest.raises(CosyError, match="no word boundary"):
        tts.sentences("x" * 80, len(prompt.text))
    with pytest.raises(CosyError, match="leaves no room for the text"):
        tts.sentences(TEXT, limit)


def test_integer_pcm_prompt_arrays_are_scaled_like_the_file(system):
    tts = system["tts"]
    samples, rate = synthetic_prompt(2.0)
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
    as_float = tts.prompt((pcm.astype(np.float32) / 32768, rate))
    as_int = tts.prompt((pcm, rate))
    assert torch.equal(as_int.tokens, as_float.tokens)
    torch.testing.assert_close(as_int.mel, as_float.mel)
    with pytest.raises(CosyError, match="float or signed integer PCM, got dtype uint8"):
        tts.prompt((np.full(rate, 128, dtype=np.uint8), rate))


def test_synthesis_settings_are_checked():
    from cosy.inference.model_dir import SynthesisConfig

    SynthesisConfig().check()
    for field, value, message in (("pause_seconds", -0.1, "synthesis.pause_seconds must be >= 0, got -0.1"),
                                  ("batch_size", 0, "synthesis.batch_size must be >= 1"),
                                  ("lang", "fr", "synthesis.lang must be auto, en or zh, got 'fr'"),
                                  ("max_prompt_seconds", 0.5, "must be >= min_prompt_seconds"),
                                  ("prompt_warp_semitones", 13, "must be 0 or in [0.2, 12]"),
                                  ("prompt_warp_semitones", 0.1, "must be 0 or in [0.2, 12]"),
                                  ("vocoder_adapt_steps", -1, "synthesis.vocoder_adapt_steps must be >= 0"),
                                  ("vocoder_adapt_lr", 0.0, "synthesis.vocoder_adapt_lr must be > 0")):
        with pytest.raises(CosyError, match=re.escape(message)):
            SynthesisConfig(**{field: value}).check()


def test_missing_default_model_says_to_pass_model_dir(system, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cosy.inference.pipeline.DEFAULT_MODEL_DIR", tmp_path / "not_installed")
    assert cli("synthesize", "--text", TEXT, "--prompt-wav", system["prompt"], "--out", tmp_path / "x.wav") == 1
    err = capsys.readouterr().err
    assert "no default model is installed" in err and "--model-dir" in err


def test_text_file_and_manifest_write_one_wav_per_line(system, tmp_path, capsys):
    # a Unicode line separator inside a line is a sentence break, not a new line
    lines = ["The first line of the file is here.", "", "A second line\u2028follows it.", "And the third one ends it.",
             "... !"]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli("synthesize", "--text-file", tmp_path / "lines.txt", "--prompt-wav", system["prompt"],
               "--model-dir", system["model"], "--out-dir", tmp_path / "lines", "--seed", 0) == 0
    assert sorted(p.name for p in (tmp_path / "lines").iterdir()) == ["0001.wav", "0003.wav", "0004.wav"]
    assert "skipped line(s) 5" in capsys.readouterr().out
    for number in (1, 3, 4):
        wave, rate = sf.read(tmp_path / "lines" / f"{number:04d}.wav")
        low, high = audio_bounds(system["tts"], lines[number - 1])
        assert low <= len(wave) / rate <= high
    bad = _bad_prompts(tmp_path)
    shutil.copy(system["prompt"], tmp_path / "voice.wav")
    manifest = tmp_path / "list.tsv"
    manifest.write_text(f"u1\t{lines[0]}\tvoice.wav\n"
                        f"u0\t{lines[2]}\tvoice.wav\n"
                        f"u2\t{lines[2]}\t{bad['silent'][0]}\n"
                        f"u3\t{lines[3]}\t{system['prompt']}\tA prompt recording says hello.\n")
    capsys.readouterr()
    assert cli("synthesize", "--manifest", manifest, "--model-dir", system["model"], "--out-dir",
               tmp_path / "m") == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["u0.wav", "u1.wav", "u3.wav"]
    assert "skipped 1: u2" in capsys.readouterr().out
    manifest.write_text("u1 only two\tfields\n")
    assert cli("synthesize", "--manifest", manifest, "--model-dir", system["model"], "--out-dir", tmp_path) == 1
    assert "line 1: expected utt<TAB>text<TAB>prompt_wav" in capsys.readouterr().err


def test_manifest_analyses_each_prompt_when_its_first_line_comes(system, tmp_path, capsys, monkeypatch):
    events = []
    analyse, speak = CosyTTS.prompt, CosyTTS.synthesize_batch
    monkeypatch.setattr(CosyTTS, "prompt", lambda self, wav, text=None: events.append(("prompt", Path(wav).name))
                        or analyse(self, wav, text))
    monkeypatch.setattr(CosyTTS, "synthesize_batch", lambda self, texts, *a: events.append(("speak", len(texts)))
                        or speak(self, texts, *a))
    shutil.copy(system["prompt"], tmp_path / "a.wav")
    shutil.copy(system["prompt"], tmp_path / "b.wav")
    (tmp_path / "short.wav").write_bytes(b"RIFF broken")
    manifest = tmp_path / "list.tsv"
    manifest.write_text("u1\tOne.\ta.wav\nu2\tTwo.\tshort.wav\nu3\t... !\ta.wav\nu4\tFour.\tb.wav\n"
                        "u5\tFive.\ta.wav\n")
    assert cli("synthesize", "--manifest", manifest, "--model-dir", system["model"], "--out-dir", tmp_path / "m",
               "--batch-size", 1) == 0
    assert events == [("prompt", "a.wav"), ("speak", 1), ("prompt", "short.wav"), ("prompt", "b.wav"),
                      ("speak", 1), ("speak", 1)]  # a.wav is kept for u5, not analysed again
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["u1.wav", "u4.wav", "u5.wav"]
    assert "skipped 2: u2, u3" in capsys.readouterr().out  # in the manifest's order


def test_each_text_is_normalised_once(system, tmp_path, monkeypatch):
    import cosy.text.normalise as normalise_module
    from cosy.text.split import split_sentences

    seen = []
    plain = normalise_module.normalise
    monkeypatch.setattr(normalise_module, "normalise", lambda text, lang: seen.append(text) or plain(text, lang))
    tts = system["tts"]
    texts = ["The first text is here.", "And a second one. It has two sentences."]
    (tmp_path / "lines.txt").write_text("\n".join(texts) + "\n")
    assert cli("synthesize", "--text-file", tmp_path / "lines.txt", "--prompt-wav", system["prompt"],
               "--model-dir", system["model"], "--out-dir", tmp_path / "out") == 0
    pieces = [piece for text in texts for piece in split_sentences(text, "en")]
    assert sorted(seen) == sorted(pieces)  # the skip check and the synthesis share one pass
    seen.clear()
    sum(map(len, tts.stream(texts[1], system["prompt"], seed=0)))
    spoken = tts.spoken(texts[1])
    tts.synthesize_batch([spoken, spoken], system["prompt"], seed=0)
    assert sorted(seen) == sorted(split_sentences(texts[1], "en") * 2)


def test_batch_api_returns_one_wave_per_text(system):
    tts = system["tts"]
    texts = ["One short sentence to say here.", "Another sentence, said in the same voice."]
    waves = tts.synthesize_batch(texts, system["prompt"], seed=0)
    assert len(waves) == 2
    for text, wave in zip(texts, waves):
        low, high = audio_bounds(tts, text)
        assert low <= len(wave) / tts.sample_rate <= high
    with pytest.raises(CosyError, match="got 2 texts, 3 prompt wavs"):
        tts.synthesize_batch(texts, [system["prompt"]] * 3)


def test_voice_conversion_keeps_the_source_length(system, tmp_path, capsys):
    source, rate = synthetic_prompt(2.0, 24000)
    sf.write(tmp_path / "source.wav", source, rate)
    for verb in ("vc", "convert"):
        out = tmp_path / f"{verb}.wav"
        assert cli(verb, "--source-wav", tmp_path / "source.wav", "--prompt-wav", system["prompt"],
                   "--model-dir", system["model"], "--out", out, "--seed", 0) == 0
        wave, out_rate = sf.read(out)
        assert out_rate == RATE and abs(len(wave) / out_rate - 2.0) < 0.03  # within a few mel frames
    assert cli("vc", "--source-wav", tmp_path / "none.wav", "--prompt-wav", system["prompt"],
               "--model-dir", system["model"], "--out", tmp_path / "x.wav") == 1
    assert "audio file not found" in capsys.readouterr().err
    sf.write(tmp_path / "blip.wav", source[:1000], rate)
    assert cli("vc", "--source-wav", tmp_path / "blip.wav", "--prompt-wav", system["prompt"],
               "--model-dir", system["model"], "--out", tmp_path / "x.wav") == 1
    assert "blip.wav is 0.042 s long; it must be at least 0.1 s" in capsys.readouterr().err


def test_bench_prints_a_table_and_json(system, tmp_path, capsys):
    assert cli("bench", "--model-dir", system["model"], "--json", tmp_path / "bench.json") == 0
    out = capsys.readouterr().out
    assert "offline RTF" in out and "streaming first chunk" in out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["rtf"] > 0 and result["lm_tokens_per_second"] > 0 and result["peak_rss_mb"] > 0
    assert 0 < result["stream_first_chunk_seconds"] and result["lm_tokens"] > 0


def test_import_cosy_stays_light():
    code = "import sys, cosy; assert 'torch' not in sys.modules; print(cosy.CosyTTS.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CosyTTS"


# A v2-style system: 25 tokens/s, 24 kHz mel with 2 frames per token, causal chunked flow.
CAUSAL = {
    "tokenizer": {"encoder1": {"input_size": 128, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 1,
                               "input_layer": "conv2d4", "pos_enc": "rotary", "dropout": 0.0}},
    "flow": {"causal": True, "token_rate": 25.0, "chunk_tokens": 4, "lookahead": 2, "edge_tokens": 0,
             "mel": {"sample_rate": 24000, "n_fft": 1920, "hop_length": 480, "win_length": 1920}},
    "vocoder": {"mel": {"sample_rate": 24000, "n_fft": 1920, "hop_length": 480, "win_length": 1920},
                "generator": {"base_channels": 32, "upsample_rates": [8, 6, 10], "upsample_kernels": [16, 12, 20],
                              "resblock_kernels": [3], "resblock_dilations": [[1, 3]]}},
}


def test_causal_flow_streams_chunk_by_chunk_to_the_offline_length(system, tmp_path, monkeypatch):
    import cosy.flow.model as flow_model

    dirs = dict(system["dirs"])
    dirs.update(write_random_experiments(tmp_path / "exp", "tiny", overrides=CAUSAL, parts=tuple(CAUSAL)))
    tts = CosyTTS.from_pretrained(pack(dirs, system["tokenizer"], tmp_path / "model"))
    assert tts.sample_rate == 24000 and tts.parts.flow.cfg.causal
    chunks_decoded = []
    original = flow_model.FlowStream._chunk
    monkeypatch.setattr(flow_model.FlowStream, "_chunk",
                        lambda self, n: chunks_decoded.append(n) or original(self, n))
    wave, rate = tts.synthesize(TEXT, system["prompt"], seed=5)
    streamed = list(tts.stream(TEXT, system["prompt"], seed=5))
    assert len(streamed) > 2 and sum(map(len, streamed)) == len(wave)
    assert len(wave) % 480 == 0 and chunks_decoded and max(chunks_decoded) <= 4
    with pytest.raises(CosyError, match="speed must be 1.0 for a causal flow model"):
        tts.stream(TEXT, system["prompt"], speed=1.5)  # before the first chunk, as other bad input


def test_pack_accepts_onnx_tokenizer_and_speaker(system, tmp_path):
    from cosy.speaker.extract import load_checkpoint as load_speaker
    from cosy.speaker.onnx import export_onnx as export_speaker
    from cosy.tokenizer.extract import load_checkpoint as load_tokenizer
    from cosy.tokenizer.onnx import export_onnx as export_tokenizer

    dirs = dict(system["dirs"])
    dirs["tokenizer"] = export_tokenizer(load_tokenizer(dirs["tokenizer"] / "model.safetensors"), tmp_path / "t.onnx")
    dirs["speaker"] = tmp_path / "s.onnx"
    export_speaker(load_speaker(system["model"] / "speaker" / "model.safetensors"), dirs["speaker"])
    model = pack(dirs, system["tokenizer"], tmp_path / "model")
    config = yaml.safe_load((model / "config.yaml").read_text())
    assert config["tokenizer"] == "tokenizer/model.onnx" and config["speaker"] == "speaker/model.onnx"
    onnx_tts = CosyTTS.from_pretrained(model)
    reference = system["tts"].prompt(system["prompt"])
    prompt = onnx_tts.prompt(system["prompt"])
    assert np.array_equal(prompt.tokens.numpy(), reference.tokens.numpy())
    np.testing.assert_allclose(prompt.embedding.numpy(), reference.embedding.numpy(), atol=1e-4)  # ONNX rounding
    wave, rate = onnx_tts.synthesize("One more short sentence here.", system["prompt"], seed=0)
    assert rate == RATE and len(wave) > 0


def test_redecoder_grows_its_chunks_and_ends_at_the_offline_length(system):
    import torch

    from cosy.inference.streaming import Redecoder

    tts = system["tts"]
    flow, prompt = tts.parts.flow, tts.prompt(system["prompt"])
    decoder = Redecoder(flow, prompt.tokens[None], prompt.mel[None], prompt.embedding[None], chunk_tokens=10,
                        holdback_tokens=3, growth=2.0)
    sizes = []
    for token in torch.randint(0, 64, (100,)).tolist():
        sizes.append(decoder.push(torch.tensor([[token]])).shape[2])
    decodes = [i + 1 for i, size in enumerate(sizes) if size]
    assert decodes == [10, 30, 70]  # chunks of 10, 20, 40 tokens
    assert sizes[9] == flow.cfg.frames_for(10 - 3)  # the last 3 tokens' frames are held back
    assert sum(sizes) + decoder.finish().shape[2] == flow.cfg.frames_for(100)


def test_flow_steps_set_the_solver_steps_offline_and_streaming(system, tmp_path, capsys):
    tts = CosyTTS.from_pretrained(system["model"])
    calls = []
    tts.parts.flow.estimator.register_forward_hook(lambda *_: calls.append(1))
    tts.synthesize("Hello.", system["prompt"], seed=0)
    default = len(calls)
    assert default == tts.parts.flow.cfg.cfm.steps == 10  # one sentence, one batched call a step
    tts.set_flow_steps(3)
    calls.clear()
    tts.synthesize("Hello.", system["prompt"], seed=0)
    assert len(calls) == 3
    calls.clear()
    list(tts.stream("Hello.", system["prompt"], seed=0))
    assert len(calls) % 3 == 0 and len(calls) > 0
    with pytest.raises(CosyError, match="at least 1"):
        tts.set_flow_steps(0)
    assert cli("synthesize", "--text", "Hello.", "--prompt-wav", system["prompt"], "--model-dir", system["model"],
               "--out", tmp_path / "a.wav", "--flow-steps", 0) != 0
    assert "--flow-steps must be at least 1" in capsys.readouterr().err
    assert cli("synthesize", "--text", "Hello.", "--prompt-wav", system["prompt"], "--model-dir", system["model"],
               "--out", tmp_path / "a.wav", "--flow-steps", 2) == 0
    assert cli("bench", "--model-dir", system["model"], "--steps", 2, "--json", tmp_path / "bench.json") == 0
    assert json.loads((tmp_path / "bench.json").read_text())["flow_steps"] == 2


# ---------------------------------------------------------------------------- cosy serve

VOICE_TEXT = "Some words of the prompt."


@pytest.fixture(scope="module")
def server(system, tmp_path_factory):
    """`cosy serve` on a free port, with the session's prompt as the voice 'me-1'."""
    import threading

    from cosy.data.kaldi import DataDir
    from cosy.inference.server import TTSServer, load_voices

    voices_dir = tmp_path_factory.mktemp("voices")
    DataDir({"me-1": str(system["prompt"])}, {"me-1": VOICE_TEXT}, {"me-1": "me"}).save(voices_dir)
    tts = system["tts"]
    srv = TTSServer(("127.0.0.1", 0), tts, load_voices(tts, voices_dir))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield {"host": "127.0.0.1", "port": srv.server_address[1], "tts": tts}
    srv.shutdown()
    srv.server_close()


def post(server, payload, path="/synthesize", conn=None):
    """POST JSON -> (status, headers, body bytes), over `conn` if given (keep-alive)."""
    import http.client

    own = conn is None
    conn = conn or http.client.HTTPConnection(server["host"], server["port"], timeout=120)
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    out = response.status, response.headers, response.read()
    if own:
        conn.close()
    return out


def raw_exchange(server, request: bytes) -> bytes:
    """Send raw request bytes and read the whole answer until the server closes."""
    import socket

    with socket.create_connection((server["host"], server["port"]), timeout=120) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return answer


def test_server_speaks_a_named_voice_and_a_posted_prompt_as_the_api_does(server, system):
    import base64
    import http.client

    from cosy.audio import encode_audio

    tts = server["tts"]
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=120)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "sample_rate": RATE, "voices": ["me-1"]}

    # the same connection throughout: keep-alive holds across requests and errors
    status, headers, body = post(server, {"text": TEXT, "voice": "me-1", "seed": 3}, conn=conn)
    expected, _ = tts.synthesize(TEXT, tts.prompt(system["prompt"], VOICE_TEXT), seed=3)
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    assert body == encode_audio(expected, RATE)

    assert post(server, {"text": TEXT}, path="/speak", conn=conn)[0] == 404
    wav = base64.b64encode(system["prompt"].read_bytes()).decode()
    status, _, body = post(server, {"text": TEXT, "prompt_wav": wav, "seed": 5, "speed": 1.5}, conn=conn)
    expected, _ = tts.synthesize(TEXT, system["prompt"], seed=5, speed=1.5)
    assert status == 200 and body == encode_audio(expected, RATE)
    conn.close()


def test_server_streams_the_api_stream_in_several_http_chunks(server, system):
    tts = server["tts"]
    body = json.dumps({"text": TEXT, "voice": "me-1", "seed": 7, "stream": True}).encode()
    answer = raw_exchange(server, b"POST /synthesize HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert f"X-Sample-Rate: {RATE}".encode() in head
    chunks = []
    while True:  # undo the chunked framing by hand
        size, rest = rest.split(b"\r\n", 1)
        size = int(size, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768
    expected = np.concatenate(list(tts.stream(TEXT, tts.prompt(system["prompt"], VOICE_TEXT), seed=7)))
    assert len(chunks) > 1 and pcm.shape == expected.shape
    np.testing.assert_allclose(pcm, np.clip(expected, -1, 1), atol=2 / 32768)

    http10 = raw_exchange(server, b"POST /synthesize HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head, rest = http10.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head and rest == b"".join(chunks)


def short_wav_base64() -> str:
    import base64
    import io

    buffer = io.BytesIO()
    sf.write(buffer, np.full(800, 0.1, dtype=np.float32), 16000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not JSON"),
    ({"voice": "me-1"}, "text: a non-empty string"),
    ({"text": TEXT, "voice": "me-1", "volume": 2}, "unknown field(s) volume"),
    ({"text": TEXT}, "exactly one of voice"),
    ({"text": TEXT, "voice": "me-1", "prompt_wav": "AAAA"}, "exactly one of voice"),
    ({"text": TEXT, "voice": "you"}, "unknown voice 'you'; this server has: me-1"),
    ({"text": TEXT, "voice": 3}, "voice: a voice name"),
    ({"text": TEXT, "voice": "me-1", "prompt_text": "hi"}, "prompt_text goes with prompt_wav"),
    ({"text": TEXT, "prompt_wav": "not base64!"}, "prompt_wav: not base64"),
    ({"text": TEXT, "prompt_wav": None}, "exactly one of voice"),
    ({"text": TEXT, "prompt_wav": 12}, "prompt_wav: a base64 audio file"),
    ({"text": TEXT, "prompt_wav": "bm90IGF1ZGlv"}, "prompt_wav: cannot read audio <bytes>: Format not recognised"),
    ({"text": TEXT, "prompt_wav": short_wav_base64()}, "prompt_wav: prompt array is 0.05 s long; it must be at least 1 s"),
    ({"text": TEXT, "voice": "me-1", "speed": "fast"}, "speed: a number"),
    ({"text": TEXT, "voice": "me-1", "speed": 10**400}, "speed: must be between"),
    ({"text": TEXT, "voice": "me-1", "seed": 1.5}, "seed: an integer"),
    ({"text": TEXT, "voice": "me-1", "seed": 2**64}, "seed: must be between"),
    ({"text": TEXT, "voice": "me-1", "stream": 1}, "stream: true or false"),
    ({"text": "...", "voice": "me-1"}, "nothing speakable"),
    ({"text": "a" * 5001, "voice": "me-1"}, "text: at most 5000 characters per request, got 5001"),
])
def test_server_answers_a_bad_request_with_400_naming_the_field(server, payload, message):
    status, headers, body = post(server, payload)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert message in json.loads(body)["error"]


@pytest.mark.parametrize("headers, status", [
    (b"Transfer-Encoding: chunked\r\n", b"411"),
    (b"Content-Length: banana\r\n", b"411"),
    (b"Content-Length: %d\r\nExpect: 100-continue\r\n" % (1 << 30), b"413"),
])
def test_server_refuses_bodies_it_cannot_frame_or_take_and_closes(server, headers, status):
    answer = raw_exchange(server, b"POST /synthesize HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in head
    assert "error" in json.loads(body)


def test_load_voices_names_the_unusable_utterance(system, tmp_path):
    from cosy.data.kaldi import DataDir
    from cosy.inference.server import load_voices

    short = tmp_path / "short.wav"
    sf.write(short, np.full(800, 0.1, dtype=np.float32), 16000)
    DataDir({"tiny-1": str(short)}, {"tiny-1": "hi"}, {"tiny-1": "tiny"}).save(tmp_path / "voices")
    with pytest.raises(CosyError, match=r"--voices .*voices: utterance tiny-1: prompt .*short.wav is 0.05 s long"):
        load_voices(system["tts"], tmp_path / "voices")
