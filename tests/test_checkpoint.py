"""cosy.checkpoint: finding an experiment's config, reading its weights, and the errors."""

from dataclasses import dataclass

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cosy.checkpoint import find_experiment_config, load_weights, read_experiment, read_weights
from cosy.errors import CosyError


@dataclass
class TinyConfig:
    dim: int = 3
    out: int = 2


def build(cfg: TinyConfig) -> torch.nn.Module:
    return torch.nn.Linear(cfg.dim, cfg.out)


def write_experiment(folder, task="tiny", model=None, state=None, name="step_1.safetensors"):
    """An experiment dir `folder` with config.yaml and a weights file; returns the weights path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": task, "model": model or {"dim": 3, "out": 2}}))
    torch.manual_seed(0)
    state = state if state is not None else {f"encoder.{k}": v for k, v in build(TinyConfig()).state_dict().items()}
    save_file(state, str(folder / name))
    return folder / name


def test_reads_config_beside_and_strips_the_prefix(tmp_path):
    weights = write_experiment(tmp_path / "exp", model={"dim": 3, "out": 2},
                               state={"encoder.weight": torch.ones(2, 3), "encoder.bias": torch.zeros(2),
                                      "classifier.weight": torch.ones(5, 2)})
    cfg, state, config_path = read_experiment(weights, "tiny", TinyConfig, prefix="encoder.")
    assert cfg == TinyConfig(dim=3, out=2)
    assert config_path == tmp_path / "exp" / "config.yaml"
    assert sorted(state) == ["bias", "weight"]
    module = load_weights(build(cfg), state, weights, config_path)
    assert torch.equal(module.weight, torch.ones(2, 3)) and torch.equal(module.bias, torch.zeros(2))


def test_prefix_absent_keeps_every_key(tmp_path):
    weights = write_experiment(tmp_path, state={"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert sorted(read_weights(weights, prefix="encoder.")) == ["bias", "weight"]


def test_config_one_folder_up_or_given(tmp_path):
    write_experiment(tmp_path / "exp")
    averaged = tmp_path / "exp" / "avg" / "model.safetensors"
    averaged.parent.mkdir()
    save_file(build(TinyConfig()).state_dict(), str(averaged))
    assert find_experiment_config(averaged) == tmp_path / "exp" / "config.yaml"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"task": "tiny", "model": {"dim": 4}}))
    assert find_experiment_config(averaged, other) == other
    assert read_experiment(averaged, "tiny", TinyConfig, config=other).cfg.dim == 4


def test_missing_config_names_the_weights(tmp_path):
    weights = tmp_path / "a" / "b" / "w.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(CosyError, match="no config.yaml") as err:
        read_experiment(weights, "tiny", TinyConfig)
    assert str(weights) in str(err.value)
    with pytest.raises(CosyError, match=f"config file not found: {tmp_path / 'none.yaml'}"):
        read_experiment(weights, "tiny", TinyConfig, config=tmp_path / "none.yaml")


def test_missing_weights_named(tmp_path):
    with pytest.raises(CosyError, match=f"checkpoint not found: {tmp_path / 'w.safetensors'}"):
        read_experiment(tmp_path / "w.safetensors", "tiny", TinyConfig)


def test_wrong_task_names_config_and_tasks(tmp_path):
    weights = write_experiment(tmp_path, task="flow")
    with pytest.raises(CosyError) as err:
        read_experiment(weights, "tiny", TinyConfig)
    assert str(tmp_path / "config.yaml") in str(err.value)
    assert "'flow'" in str(err.value) and "not 'tiny'" in str(err.value)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {}}))
    with pytest.raises(CosyError, match="task is None, not 'tiny'"):
        read_experiment(weights, "tiny", TinyConfig)


@pytest.mark.parametrize("model, key", [({"dimm": 3}, "model.dimm"), ({"dim": "three"}, "model.dim"),
                                        (["dim"], "model")])
def test_bad_model_key_named_with_the_file(tmp_path, model, key):
    weights = write_experiment(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"task": "tiny", "model": model}))
    with pytest.raises(CosyError, match=f"'{key}'") as err:
        read_experiment(weights, "tiny", TinyConfig)
    assert str(err.value).startswith(f"{tmp_path / 'config.yaml'}:")


@pytest.mark.parametrize("name, content", [("w.safetensors", b"junk"), ("w.safetensors", b""), ("w.pt", b"junk")])
def test_unreadable_weights_named(tmp_path, name, content):
    write_experiment(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CosyError, match=f"cannot read checkpoint {tmp_path / name}"):
        read_experiment(tmp_path / name, "tiny", TinyConfig)


def test_pt_checkpoint_model_entry(tmp_path):
    state = build(TinyConfig()).state_dict()
    torch.save({"model": state, "step": 3}, tmp_path / "w.pt")
    loaded = read_weights(tmp_path / "w.pt")
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"step": 3}, tmp_path / "bad.pt")
    with pytest.raises(CosyError, match=f"checkpoint {tmp_path / 'bad.pt'} holds no state dict"):
        read_weights(tmp_path / "bad.pt")


def test_wrong_shape_names_parameter_and_files(tmp_path):
    weights = write_experiment(tmp_path, model={"dim": 4, "out": 2})
    cfg, state, config_path = read_experiment(weights, "tiny", TinyConfig, prefix="encoder.")
    module = build(cfg)
    before = module.weight.detach().clone()
    with pytest.raises(CosyError) as err:
        load_weights(module, state, weights, config_path)
    message = str(err.value)
    assert f"{weights} does not fit {config_path}" in message
    assert "'weight' has shape (2, 3) in the file, (2, 4) in the model" in message
    assert torch.equal(module.weight, before)  # nothing was loaded


def test_missing_and_unexpected_keys_named(tmp_path):
    weights = write_experiment(tmp_path, state={"weight": torch.ones(2, 3), "scale": torch.ones(2)})
    cfg, state, config_path = read_experiment(weights, "tiny", TinyConfig)
    with pytest.raises(CosyError) as err:
        load_weights(build(cfg), state, weights, config_path)
    assert f"{weights} does not fit {config_path}" in str(err.value)
    assert "missing ['bias']" in str(err.value) and "unexpected ['scale']" in str(err.value)
