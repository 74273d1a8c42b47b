"""Synthesis for people: model directories, `CosyTTS`, streaming and the commands."""

from cosy.inference.model_dir import ModelDirConfig, SynthesisConfig, load, pack
from cosy.inference.pipeline import CosyTTS

__all__ = ["CosyTTS", "ModelDirConfig", "SynthesisConfig", "load", "pack"]
