"""`cosy export tokenizer CKPT --onnx OUT.onnx`: the released speech-tokenizer contract.

Inputs `feats` float32 [B, 128, T] (Whisper log-mel, zero beyond each row's length) and
`feats_length` int32 [B]; output `indices` int64 [B, ceil(T / r)] (r = 2 for 50 tokens/s,
4 for 25), batch and time dynamic. Tokens past a row's ceil(length / r) are padding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cosy.errors import CosyError
from cosy.tokenizer.model import TokenizerModel

OPSET = 17


class _Tokens(nn.Module):
    def __init__(self, model: TokenizerModel):
        super().__init__()
        self.model = model

    def forward(self, feats: Tensor, feats_length: Tensor) -> Tensor:
        return self.model.tokenize(feats, feats_length)[0]


def export_onnx(model: TokenizerModel, path: str | Path) -> Path:
    """Write `model`'s tokenizer (log-mel -> codes) to `path`."""
    if model.quantizer.codebook_size == 0:
        raise CosyError("this tokenizer was trained with model.quantizer.kind 'none': it has no tokens to export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the exporter restores the wrapper's train/eval mode recursively afterwards: keep it in eval
    wrapper = _Tokens(model).eval()
    frames = min(4 * 37, model.max_frames)  # any length works
    feats = torch.zeros(2, model.cfg.mel.n_mels, frames)
    lengths = torch.tensor([frames, frames - 13], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        torch.onnx.export(
            wrapper, (feats, lengths), str(path), dynamo=False, opset_version=OPSET,
            input_names=["feats", "feats_length"], output_names=["indices"],
            dynamic_axes={"feats": {0: "batch", 2: "frames"}, "feats_length": {0: "batch"},
                          "indices": {0: "batch", 1: "tokens"}},
        )
    return path


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="tokenizer checkpoint (.safetensors with config.yaml beside it)")
    parser.add_argument("--onnx", required=True, help="output .onnx file")


def run(args) -> int:
    from cosy.tokenizer.extract import load_checkpoint

    out = export_onnx(load_checkpoint(args.checkpoint), args.onnx)
    print(f"wrote {out}")
    return 0
