"""`cosy vc` (also `cosy convert --source-wav ...`): voice conversion.

    cosy vc --source-wav SRC.wav --prompt-wav VOICE.wav --out OUT.wav [--model-dir DIR]

The source's speech tokens (its words) are decoded by the flow model with the prompt's
speaker embedding and mel, so the output says what the source says in the prompt's voice.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source-wav", required=True, help="recording whose words are kept")
    parser.add_argument("--prompt-wav", required=True, help="recording of the target voice (>= 1 s)")
    parser.add_argument("--out", required=True, help="output WAV")
    parser.add_argument("--model-dir", help="model dir made by `cosy pack` (default: the installed model)")
    parser.add_argument("--speed", type=float, default=1.0, help="speaking rate factor (> 1 is faster)")
    parser.add_argument("--seed", type=int, help="random seed: the same seed gives the same samples")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from cosy.audio import check_audio_path, save_audio
    from cosy.inference.pipeline import CosyTTS

    check_audio_path(args.out, "--out")
    tts = CosyTTS.from_pretrained(args.model_dir, args.device)
    wave, rate = tts.convert(args.source_wav, args.prompt_wav, args.speed, args.seed)
    save_audio(args.out, wave, rate)
    print(f"wrote {args.out}")
    return 0
