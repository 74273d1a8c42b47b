"""`cosy export speaker`: a speaker checkpoint as ONNX in the released contract.

Input 0 `feats`: float32 [1, frames, n_mels] mean-normalised fbank, frames dynamic;
output 0 `embedding`: float32 [1, embedding_dim].
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from cosy.errors import CosyError
from cosy.speaker.extract import OnnxEncoder, load_checkpoint
from cosy.speaker.model import SpeakerEncoder


def export_onnx(encoder: SpeakerEncoder, path: str | Path, opset: int = 17) -> None:
    encoder = encoder.eval()
    example = torch.randn(1, 200, encoder.cfg.feat_dim)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # The torch.export-based exporter needs onnxscript, which cosy does not depend on;
    # the TorchScript one handles this static graph and warns that it is legacy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["feats"], output_names=["embedding"],
                          dynamic_axes={"feats": {1: "frames"}})


def parity(encoder: SpeakerEncoder, path: str | Path, frames: tuple[int, ...] = (123, 301, 777),
           seed: int = 0) -> float:
    """Smallest cosine between PyTorch and onnxruntime embeddings over inputs of several lengths."""
    onnx_encoder = OnnxEncoder(path)
    generator = torch.Generator().manual_seed(seed)
    worst = 1.0
    for n in frames:
        feats = torch.randn(n, encoder.cfg.feat_dim, generator=generator)
        feats = feats - feats.mean(0)
        with torch.inference_mode():
            a = encoder.eval()(feats[None])[0].double().numpy()
        b = onnx_encoder(feats).astype(np.float64)
        worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return worst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="speaker checkpoint (.safetensors with config.yaml beside it)")
    parser.add_argument("--onnx", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")


def run(args: argparse.Namespace) -> int:
    if Path(args.onnx).suffix != ".onnx":
        raise CosyError(f"--onnx must end in .onnx, got {args.onnx}")
    encoder = load_checkpoint(args.checkpoint)
    export_onnx(encoder, args.onnx, args.opset)
    cosine = parity(encoder, args.onnx)
    print(f"wrote {args.onnx}: [1, frames, {encoder.cfg.feat_dim}] -> [1, {encoder.cfg.embedding_dim}]; "
          f"onnxruntime/PyTorch cosine {cosine:.6f}")
    return 0
