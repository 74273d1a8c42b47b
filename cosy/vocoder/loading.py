"""Load a trained vocoder generator from a checkpoint and its experiment config."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from cosy import config
from cosy.errors import CosyError
from cosy.vocoder.hifigan import Generator
from cosy.vocoder.model import VocoderConfig


def find_config(checkpoint: Path, config_path: str | Path | None) -> Path:
    """The given config, else `config.yaml` next to the checkpoint or one folder up."""
    if config_path is not None:
        return Path(config_path)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise CosyError(f"no config.yaml next to {checkpoint} or above it: pass --config")


def load_generator(checkpoint: str | Path, config_path: str | Path | None = None) -> tuple[Generator, VocoderConfig]:
    """Generator (eval mode, weight norm folded) from a `.safetensors` checkpoint holding the
    whole GAN model (`generator.*` keys, as the trainer saves it) or the generator alone."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CosyError(f"vocoder checkpoint not found: {checkpoint}")
    cfg_file = find_config(checkpoint, config_path)
    data = config.load_yaml(cfg_file)
    if data.get("task", "vocoder") != "vocoder":
        raise CosyError(f"{cfg_file}: task is '{data.get('task')}', not vocoder")
    try:
        cfg = config.from_dict(VocoderConfig, data.get("model", {}), "model")
    except CosyError as err:
        raise CosyError(f"{cfg_file}: {err}") from err
    try:
        state = load_file(str(checkpoint))
    except Exception as err:  # safetensors raises several types for bad files
        raise CosyError(f"cannot read checkpoint {checkpoint}: {err}") from err
    if any(k.startswith("generator.") for k in state):
        state = {k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")}
    generator = Generator(cfg.generator, cfg.mel)
    missing, unexpected = generator.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CosyError(f"{checkpoint} does not fit the generator of {cfg_file}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return generator.eval().remove_weight_norm(), cfg
