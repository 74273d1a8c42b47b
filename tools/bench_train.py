"""Training speed of the engine: steps/s of a small transformer, fp32 vs bf16 (and on CUDA fp16) autocast.

The model is a cosy.modules Encoder (4 layers, d_model 256, 4 heads, FFN 1024) with a
linear head regressing 80-dim frames, trained on batches of 16 x 200 random frames
through the real Trainer (loader, optimiser, clipping, logging). Each precision is run
for a short and a long number of steps; steps/s comes from the difference, so start-up,
the final validation and the checkpoint cancel out.

    OMP_NUM_THREADS=2 python tools/bench_train.py [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from cosy.data.loader import DataConfig
from cosy.modules.transformer import Encoder, EncoderConfig
from cosy.train.schedule import SchedulerConfig
from cosy.train.task import Task
from cosy.train.trainer import ExperimentConfig, TrainConfig, Trainer

FRAMES = 200
BATCH = 16


@dataclass
class BenchConfig:
    encoder: EncoderConfig


class FrameRegressor(nn.Module):
    """(batch, frames, 80) -> encoder -> (batch, frames, 80); masked L1 to the input."""

    def __init__(self, config: BenchConfig):
        super().__init__()
        self.encoder = Encoder(config.encoder)
        self.head = nn.Linear(config.encoder.d_model, config.encoder.input_size)

    def forward(self, batch):
        hidden, lengths = self.encoder(batch["feats"], batch["lengths"])
        error = (self.head(hidden).float() - batch["feats"]).abs().mean(-1)
        mask = torch.arange(error.shape[1], device=error.device) < lengths[:, None]
        return {"loss": (error * mask).sum() / mask.sum()}


def random_frames(row):
    return {"utt": row["utt"], "feats": torch.randn(FRAMES, 80)}


TASK = Task(
    name="bench", config_cls=BenchConfig, build=FrameRegressor,
    processors=lambda config, train: [random_frames],
    collate=lambda rows: {"feats": torch.stack([r["feats"] for r in rows]),
                          "lengths": torch.full((len(rows),), FRAMES)},
    num_frames=lambda row: FRAMES,
)


def write_list(folder: Path, rows: int) -> Path:
    folder.mkdir(parents=True)
    table = pa.table({"utt": [f"u{i:05d}" for i in range(rows)], "duration": [FRAMES / 100] * rows})
    pq.write_table(table, folder / "shard_00000.parquet")
    listing = folder / "data.list"
    listing.write_text(f"{folder / 'shard_00000.parquet'}\n")
    return listing


def seconds_for(steps: int, precision: str, root: Path, train: Path, cv: Path) -> tuple[float, float]:
    """Wall and CPU (all threads) seconds of a whole run of `steps` steps."""
    encoder = EncoderConfig(input_size=80, d_model=256, n_heads=4, ffn_dim=1024, n_layers=4, pos_enc="abs")
    config = ExperimentConfig(
        task="bench", model=BenchConfig(encoder),
        data=DataConfig(shuffle=False, sort=False, batch_type="static", batch_size=BATCH),
        train=TrainConfig(max_steps=steps, max_epochs=0, precision=precision, log_every=1000,
                          scheduler=SchedulerConfig(warmup_steps=100)))
    trainer = Trainer(config, TASK, train, cv, root / f"{precision}_{steps}")
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps timed per precision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        short = 2
        train = write_list(root / "train", BATCH * (short + args.steps))
        cv = write_list(root / "cv", 1)
        warmup = root / "warmup"
        warmup.mkdir()
        print(f"small transformer: 4 layers, d 256, batch {BATCH} x {FRAMES} frames, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
        # CPU seconds stay meaningful when other jobs share the cores; wall time does not
        # fp16 (with its loss scaler) only where it runs: the trainer refuses it on CPU
        for precision in ("fp32", "bf16", "fp16") if torch.cuda.is_available() else ("fp32", "bf16"):
            # an untimed run first: the one-off costs of a precision (CUDA kernels loaded and
            # tuned on first use) would otherwise land in one timed run and not in the other
            seconds_for(short, precision, warmup, train, cv)
            short_wall, short_cpu = seconds_for(short, precision, root, train, cv)
            long_wall, long_cpu = seconds_for(short + args.steps, precision, root, train, cv)
            wall, cpu = long_wall - short_wall, long_cpu - short_cpu
            print(f"{precision:5s} {args.steps / wall:6.2f} steps/s  ({1000 * wall / args.steps:7.1f} ms/step wall, "
                  f"{cpu / args.steps:6.2f} CPU-s/step)")


if __name__ == "__main__":
    main()
