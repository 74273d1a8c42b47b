"""`cosy export vocoder`: the generator as an ONNX graph, and a runtime for it.

The whole generator exports to ONNX, HiFT included: its STFT pair is written as fixed
convolutions (cosy.vocoder.hift.STFT), so no TorchScript fallback is needed. The graph
is deterministic: HiFT's random draws are inputs.

Inputs: `mel` float32 (batch, n_mels, frames); for HiFT also `uniform` (batch, harmonics + 1)
in [0, 1) (start phases) and `gaussian` (batch, frames * hop, harmonics + 1) standard
normal (excitation noise); `uniform` is absent with `source.phase: frame`, which has no
random start phases. Output: `wave` (batch, frames * hop).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cosy.errors import CosyError
from cosy.vocoder.hifigan import Generator
from cosy.vocoder.loading import load_generator


class _Exported(nn.Module):
    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, mel: torch.Tensor, uniform: torch.Tensor | None = None,
                gaussian: torch.Tensor | None = None) -> torch.Tensor:
        gen = self.generator
        if gen.source is None:
            return gen.decode(mel)
        source = gen.make_source(gen.predict_f0(mel), uniform=uniform, gaussian=gaussian)
        return gen.decode(mel, source)


def export_onnx(generator: Generator, path: str | Path, opset: int = 17) -> None:
    """Write `generator` (eval mode, weight norm folded) to ONNX with dynamic batch and length."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = generator.eval()
    frames = 8
    mel = torch.zeros(1, generator.mel.n_mels, frames)
    names, axes, args = ["mel"], {"mel": {0: "batch", 2: "frames"}, "wave": {0: "batch", 1: "samples"}}, (mel,)
    if generator.source is not None:
        harmonics = generator.source.multiples.numel()
        args = (mel, torch.rand(1, harmonics), torch.randn(1, frames * generator.hop, harmonics))
        names += ["uniform", "gaussian"]
        axes.update({"uniform": {0: "batch"}, "gaussian": {0: "batch", 1: "samples"}})
    # the exporter warns about constant folding of strided slices, which is harmless here
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(_Exported(generator), args, str(path), input_names=names, output_names=["wave"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    meta = {"sample_rate": generator.mel.sample_rate, "hop_length": generator.hop, "n_mels": generator.mel.n_mels,
            "harmonics": int(generator.source.multiples.numel()) if generator.source else 0}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


class OnnxVocoder:
    """Runs an exported generator with onnxruntime; draws HiFT's noise with numpy."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise CosyError(f"{path}: an exported vocoder needs the .onnx file and its .json beside it")
        self.meta = json.loads(path.with_suffix(".json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, mel: np.ndarray, uniform: np.ndarray | None = None, gaussian: np.ndarray | None = None,
                 seed: int | None = None) -> np.ndarray:
        """mel (batch, n_mels, frames) -> wave (batch, frames * hop)."""
        feed = {"mel": np.ascontiguousarray(mel, dtype=np.float32)}
        wanted = {i.name for i in self.session.get_inputs()}  # the frame-phase source has no start phases
        if "gaussian" in wanted:
            rng = np.random.default_rng(seed)
            batch, _, frames = mel.shape
            h = self.meta["harmonics"]
            noise = rng.standard_normal((batch, frames * self.meta["hop_length"], h)) if gaussian is None else gaussian
            feed["gaussian"] = noise.astype(np.float32)
            if "uniform" in wanted:
                feed["uniform"] = (rng.random((batch, h)) if uniform is None else uniform).astype(np.float32)
        return self.session.run(["wave"], feed)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="vocoder checkpoint (.safetensors)")
    parser.add_argument("--config", help="experiment config (default: config.yaml beside the checkpoint)")
    parser.add_argument("--onnx", required=True, help="output .onnx file (a .json with its settings is written beside)")
    parser.add_argument("--opset", type=int, default=17)


def run(args: argparse.Namespace) -> int:
    if not str(args.onnx).endswith(".onnx"):
        raise CosyError(f"--onnx {args.onnx}: the file name must end in .onnx")
    generator, _ = load_generator(args.checkpoint, args.config)
    export_onnx(generator, args.onnx, args.opset)
    print(f"wrote {args.onnx}")
    return 0
