"""`cosy export flow`: the flow estimator (the solver's hot loop) as an ONNX graph.

Inputs x (B, n_mels, T), mask (B, 1, T), mu (B, n_mels, T), t (B,), spks (B, n_mels),
cond (B, n_mels, T); output `velocity` (B, n_mels, T); batch and frames are dynamic.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from cosy.checkpoint import read_experiment, read_model_config
from cosy.flow.checkpoint import load_state
from cosy.flow.model import FlowConfig, FlowModel

INPUTS = ("x", "mask", "mu", "t", "spks", "cond")


def example_inputs(n_mels: int, frames: int = 48, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random estimator inputs; the second item is valid for 3/4 of the frames."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 1, frames)
    mask[1:, :, frames * 3 // 4:] = 0
    return (torch.randn(batch, n_mels, frames, generator=g), mask,
            torch.randn(batch, n_mels, frames, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, n_mels, generator=g), torch.randn(batch, n_mels, frames, generator=g))


def export_estimator(model: FlowModel, path: str | Path, opset: int = 17) -> None:
    """Write the estimator of `model` to `path` (an .onnx file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    estimator = model.estimator.eval()
    dynamic = {name: {0: "batch", 2: "frames"} for name in ("x", "mask", "mu", "cond")}
    dynamic.update(t={0: "batch"}, spks={0: "batch"}, velocity={0: "batch", 2: "frames"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shape-dependent Python ints
        torch.onnx.export(estimator, example_inputs(model.cfg.n_mels), str(path), dynamo=False,
                          opset_version=opset, input_names=list(INPUTS), output_names=["velocity"],
                          dynamic_axes=dynamic)


def onnx_max_diff(model: FlowModel, path: str | Path, frames: int = 61) -> float:
    """Largest |torch - onnxruntime| of the estimator on random inputs of `frames` frames."""
    import onnxruntime

    inputs = example_inputs(model.cfg.n_mels, frames=frames, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: v.numpy() for n, v in zip(INPUTS, inputs)})[0]
    with torch.no_grad():
        want = model.estimator.eval()(*inputs).numpy()
    return float(np.abs(got - want).max())


def load_model(source: str | Path, config: str | Path | None = None) -> FlowModel:
    """A FlowModel from a checkpoint (config from `config`, else config.yaml beside it or one
    folder up) or from an experiment config file alone (random weights)."""
    source = Path(source)
    if source.suffix in (".yaml", ".yml"):
        return FlowModel(read_model_config(source, "flow", FlowConfig)).eval()
    cfg, state, config_path = read_experiment(source, "flow", FlowConfig, config)
    return load_state(FlowModel(cfg), state, source, config_path).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="flow checkpoint (.safetensors/.pt) or a flow config (.yaml)")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    parser.add_argument("--config", help="config of the checkpoint (default: config.yaml beside it)")
    parser.add_argument("--opset", type=int, default=17)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.source, args.config)
    export_estimator(model, args.onnx, args.opset)
    diff = onnx_max_diff(model, args.onnx)
    print(f"wrote {args.onnx}; onnxruntime vs torch max abs diff {diff:.2e}")
    return 0
