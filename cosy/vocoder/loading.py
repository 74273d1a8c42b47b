"""Load a trained vocoder generator from a checkpoint and its experiment config."""

from __future__ import annotations

from pathlib import Path

from cosy.checkpoint import load_weights, read_experiment
from cosy.vocoder.hifigan import Generator
from cosy.vocoder.model import VocoderConfig


def load_generator(checkpoint: str | Path, config_path: str | Path | None = None) -> tuple[Generator, VocoderConfig]:
    """Generator (eval mode, weight norm folded) from a `.safetensors` checkpoint holding the
    whole GAN model (`generator.*` keys, as the trainer saves it) or the generator alone.
    The config is `config_path`, else the config.yaml beside the checkpoint or one folder up."""
    cfg, state, config_path = read_experiment(checkpoint, "vocoder", VocoderConfig, config_path, prefix="generator.")
    generator = load_weights(Generator(cfg.generator, cfg.mel), state, checkpoint, config_path)
    return generator.eval().remove_weight_norm(), cfg
