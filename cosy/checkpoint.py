"""Loading a trained part from its experiment: the weights file and the config beside it.

An experiment dir holds `config.yaml` (sections `task`, `model`, `data`, `train`) and the
trainer's weights files; an averaged model may sit one folder below it. Every loader of a
trained part (speaker encoder, tokenizer, LLM, flow decoder, vocoder) goes through here:

    cfg, state, config_path = read_experiment(weights, "speaker", SpeakerConfig, prefix="encoder.")
    encoder = load_weights(build_encoder(cfg), state, weights, config_path)

Each error names the file at fault (and the config key or parameter, where there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from safetensors.torch import load_file

from cosy import config as cfgio
from cosy.errors import CosyError

CONFIG = "config.yaml"
T = TypeVar("T")


class Experiment(NamedTuple):
    cfg: Any                                # the task's model config dataclass
    state: dict[str, torch.Tensor]          # the weights, submodule prefix removed
    config_path: Path


def find_experiment_config(weights: str | Path, config: str | Path | None = None) -> Path:
    """`config` when given, else the config.yaml beside `weights` or one folder up."""
    weights = Path(weights)
    if not weights.is_file():
        raise CosyError(f"checkpoint not found: {weights}")
    if config is not None:
        return Path(config)
    for folder in (weights.parent, weights.parent.parent):
        if (folder / CONFIG).is_file():
            return folder / CONFIG
    raise CosyError(f"checkpoint {weights}: no {CONFIG} next to it or one folder up "
                    f"(expected {weights.parent / CONFIG})")


def model_section(config_path: str | Path, task: str) -> dict:
    """The raw `model:` mapping of experiment config `config_path`, whose `task` must be `task`."""
    data = cfgio.load_yaml(config_path)
    if data.get("task") != task:
        raise CosyError(f"{config_path}: task is {data.get('task')!r}, not {task!r}")
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise CosyError(f"{config_path}: config key 'model' must be a mapping, got {type(model).__name__}")
    return dict(model or {})


def read_model_config(config_path: str | Path, task: str, config_cls: type[T]) -> T:
    """The `model:` section of experiment config `config_path` as a `config_cls`."""
    section = model_section(config_path, task)
    try:
        return cfgio.from_dict(config_cls, section, "model")
    except CosyError as err:
        raise CosyError(f"{config_path}: {err}") from err


def read_weights(path: str | Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (or the `model` entry of a .pt checkpoint).

    With `prefix` (e.g. "generator."), a file that holds a whole training model gives
    only that submodule's tensors, renamed without the prefix; a file holding the
    submodule alone is returned as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files raise many types
        raise CosyError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CosyError(f"checkpoint {path} holds no state dict of tensors")
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_experiment(weights: str | Path, task: str, config_cls: type, config: str | Path | None = None,
                    prefix: str | None = None) -> Experiment:
    """The model config and weights of a trained `task` part (see `find_experiment_config`
    and `read_weights`); the config is checked before the weights are read."""
    config_path = find_experiment_config(weights, config)
    cfg = read_model_config(config_path, task, config_cls)
    return Experiment(cfg, read_weights(weights, prefix), config_path)


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], weights: str | Path,
                 config_path: str | Path | None = None, optional: tuple[str, ...] = ()) -> torch.nn.Module:
    """Load `state` (read from `weights`) into `module` (built from `config_path`).

    A mismatch raises a CosyError naming both files and the first parameters at fault,
    rather than torch's multi-line RuntimeError. Parameters under the `optional` prefixes
    (training-only parts) may be absent from `state`, where the module keeps its own, or
    from the module, where they are ignored.
    """
    where = f"{weights} does not fit {config_path or 'the model'}"
    expected = module.state_dict()
    if optional:
        state = {k: v for k, v in state.items() if k in expected or not k.startswith(optional)}
        state.update({k: v for k, v in expected.items() if k.startswith(optional) and k not in state})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CosyError(f"{where}: missing {_first(missing)}, unexpected {_first(unexpected)}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CosyError(f"{where}: parameter '{key}' has shape {tuple(tensor.shape)} in the file, "
                            f"{tuple(expected[key].shape)} in the model")
    module.load_state_dict(state)
    return module


def _first(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"
