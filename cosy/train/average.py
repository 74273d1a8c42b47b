"""`cosy average`: average the weights of the best checkpoints of an experiment."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from cosy.errors import CosyError
from cosy.checkpoint import read_weights
from cosy.train.checkpoint import Checkpoints, save_weights

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("expdir", help="experiment directory written by `cosy train`")
    parser.add_argument("--best", type=int, default=5, help="how many checkpoints, lowest validation loss first")
    parser.add_argument("--out", required=True, help="output .safetensors file")


def run(args: argparse.Namespace) -> int:
    if args.best < 1:
        raise CosyError(f"--best must be >= 1, got {args.best}")
    expdir = Path(args.expdir)
    if not expdir.is_dir():
        raise CosyError(f"experiment directory not found: {expdir}")
    entries = Checkpoints(expdir).best(args.best)
    if not entries:
        raise CosyError(f"{expdir} has no checkpoint with a validation loss")
    if len(entries) < args.best:
        log.warning("only %d checkpoints with a validation loss in %s; averaging those", len(entries), expdir)
    averaged = average([expdir / e.weights for e in entries])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_weights(args.out, averaged)
    print(f"averaged steps {', '.join(str(e.step) for e in entries)} -> {args.out}")
    return 0


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the float tensors; other tensors (counters) come from the first file."""
    first = read_weights(paths[0])
    sums = {k: v.double() for k, v in first.items() if v.is_floating_point()}
    for path in paths[1:]:
        weights = read_weights(path)
        if weights.keys() != first.keys():
            raise CosyError(f"{path} has different tensor names from {paths[0]}")
        for key in sums:
            sums[key] += weights[key].double()
    return {k: (sums[k] / len(paths)).to(v.dtype) if k in sums else v for k, v in first.items()}
