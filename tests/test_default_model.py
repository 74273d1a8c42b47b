"""The trained model that ships in cosy/assets/default: it loads with no arguments, the
CLI uses it without --model-dir, and its model card's evaluation reproduces."""

import json
from pathlib import Path

import pytest
import soundfile as sf

from cosy.cli import main as cli_main
from cosy.inference.pipeline import DEFAULT_MODEL_DIR, CosyTTS

VOICES = Path(__file__).resolve().parents[1] / "examples" / "voices"
PROMPT = VOICES / "wavs" / "spk031-00479.flac"
TEXT = "The weather is nice today."


def test_default_model_is_installed_small_and_loads_without_arguments():
    assert (DEFAULT_MODEL_DIR / "config.yaml").is_file() and (DEFAULT_MODEL_DIR / "README.md").is_file()
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 60 * 2 ** 20
    tts = CosyTTS.from_pretrained()
    assert tts.sample_rate == 22050 and tts.parts.flow.cfg.token_rate == 25.0


def test_synthesize_cli_without_model_dir_uses_the_default_model(tmp_path):
    out = tmp_path / "hello.wav"
    assert cli_main(["synthesize", "--text", TEXT, "--prompt-wav", str(PROMPT), "--out", str(out),
                     "--seed", "0"]) == 0
    info = sf.info(out)
    assert info.samplerate == 22050 and info.frames > 0


def test_model_card_evaluation_reproduces(tmp_path):
    """The card's table is `cosy eval tts` on examples/voices; the same commands give its numbers."""
    card = json.loads((DEFAULT_MODEL_DIR / "eval.json").read_text())
    synth = tmp_path / "synth"
    assert cli_main(["data", "zeroshot", str(VOICES), str(synth)]) == 0
    assert cli_main(["synthesize", "--manifest", str(synth / "manifest.tsv"), "--out-dir", str(synth),
                     "--seed", "0"]) == 0
    assert cli_main(["eval", "tts", "--hyp-dir", str(synth), "--data", str(VOICES), "--no-mos",
                     "--speaker", str(DEFAULT_MODEL_DIR / "speaker" / "model.onnx"),
                     "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    # the recordings' scores are exact; the outputs' allow for another CPU's rounding changing
    # a sampled token (one utterance of 16 moves speaker ID by 0.0625, one speaker of 8 the
    # speaker-mean ID by 0.125)
    for system, tolerance in (("ground_truth", 1e-4), ("synthesised", 0.07)):
        for key, value in card[system].items():
            if key == "wer" or key.startswith(("sim_", "spk_id_")):
                assert report[system][key] == pytest.approx(value, abs=tolerance), key
            elif key.startswith("spk_mean_id_"):
                assert report[system][key] == pytest.approx(value, abs=2 * tolerance), key
