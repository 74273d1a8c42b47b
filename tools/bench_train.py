"""Training speed of the engine: steps/s in fp32 vs bf16 (and on CUDA fp16) autocast.

Without arguments the model is a cosy.modules Encoder (4 layers, d_model 256, 4 heads,
FFN 1024) with a linear head regressing 80-dim frames, trained on batches of 16 x 200
random frames. With `--config` and `--train-data` it is a real experiment: that YAML's
model, data pipeline (its shuffle buffer capped at 500 rows) and optimiser on those shards
(validation on the first rows of the first shard; the training list names the shards over
and over, so that no epoch ends inside the timed steps). Either way the steps run through
the real Trainer (loader, optimiser, clipping, logging), which writes no checkpoint here.
Each precision is run for a short and a long number of steps; steps/s comes from the
difference, so start-up and the final validation cancel out.

    OMP_NUM_THREADS=2 python tools/bench_train.py [--steps 5]
    OMP_NUM_THREADS=1 python tools/bench_train.py --config recipes/mini/conf/llm_default.yaml \
        --train-data exp/mini_default/shards/full/train/data.list \
        model.tokenizer=exp/mini_default/exp/text/tokenizer.json --steps 20
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
from cosy.data.shards import read_list
from cosy.errors import CosyError
from cosy.modules.transformer import Encoder, EncoderConfig
from cosy.train.schedule import SchedulerConfig
from cosy.train.task import Task
from cosy.train.trainer import ExperimentConfig, TrainConfig, Trainer, load_experiment

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


def one_shard_list(folder: Path, table: pa.Table) -> Path:
    """Write `table` as the one shard of `folder/data.list`; returns the list's path."""
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "shard_00000.parquet")
    listing = folder / "data.list"
    listing.write_text(f"{folder / 'shard_00000.parquet'}\n")
    return listing


def write_list(folder: Path, rows: int) -> Path:
    return one_shard_list(folder, pa.table({"utt": [f"u{i:05d}" for i in range(rows)],
                                            "duration": [FRAMES / 100] * rows}))


def small_transformer() -> tuple[ExperimentConfig, Task]:
    encoder = EncoderConfig(input_size=80, d_model=256, n_heads=4, ffn_dim=1024, n_layers=4, pos_enc="abs")
    config = ExperimentConfig(
        task="bench", model=BenchConfig(encoder),
        data=DataConfig(shuffle=False, sort=False, batch_type="static", batch_size=BATCH),
        train=TrainConfig(max_epochs=0, log_every=1000, scheduler=SchedulerConfig(warmup_steps=100)))
    return config, TASK


def first_rows(train_list: Path, rows: int, folder: Path) -> Path:
    """A list of one shard holding the first `rows` rows of `train_list`'s first shard."""
    return one_shard_list(folder, pq.read_table(read_list(train_list)[0]).slice(0, rows))


class UnsavedTrainer(Trainer):
    """The Trainer without its checkpoint writes. Writing a v1-size LM's weights and optimiser
    state takes about 10 s, give or take a second: that jitter, in both runs of a difference,
    outweighed ten timed steps on a GPU."""

    def _save(self, cv_loss: float | None) -> None:
        self.saved = (self.step, cv_loss)


def repeated(train_list: Path, rows: int, folder: Path) -> Path:
    """A list naming `train_list`'s shards over and over until it holds at least `rows` rows.

    An epoch's end restarts the loader and its worker processes; on a small data set that
    would land inside the timed steps."""
    shards = [Path(shard).resolve() for shard in read_list(train_list)]
    per_pass = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
    if per_pass == 0:
        raise CosyError(f"{train_list}: its shards hold no rows")
    folder.mkdir(parents=True)
    listing = folder / "data.list"
    listing.write_text("".join(f"{shard}\n" for shard in shards) * max(1, -(-rows // per_pass)))
    return listing


def seconds_for(experiment: tuple[ExperimentConfig, Task], steps: int, precision: str, root: Path,
                train: Path, cv: Path) -> tuple[float, float]:
    """Wall and CPU (all threads) seconds of a whole run of `steps` steps."""
    config, task = experiment
    t = config.train
    t.max_steps, t.max_epochs, t.precision = steps, 0, precision
    t.log_every, t.cv_every_steps, t.cv_every_epoch, t.save_every_steps = 1000, 0, False, 0
    # each run fills the shuffle buffer (rows decoded and processed) before its first batch:
    # start-up that cancels out, but whose jitter a v1 config's 10000 rows would make large
    config.data.shuffle_size = min(config.data.shuffle_size, 500)
    trainer = UnsavedTrainer(config, task, train, cv, root / f"{precision}_{steps}")
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps timed per precision")
    parser.add_argument("--config", help="an experiment YAML to time instead of the small transformer")
    parser.add_argument("--train-data", type=Path, help="with --config: its training shards' data.list")
    parser.add_argument("overrides", nargs="*", help="with --config: section.key=value overrides")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"),
                        help="the precisions to time (default: fp32 bf16, and fp16 on CUDA)")
    args = parser.parse_args()
    if args.precisions is None:  # fp16 (with its loss scaler) only where it runs: the trainer refuses it on CPU
        args.precisions = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
    if bool(args.config) != bool(args.train_data):
        parser.error("--config and --train-data go together")
    if args.overrides and not args.config:
        parser.error("overrides need --config")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        short = 2
        if args.config:
            try:
                cv = first_rows(args.train_data, 4, root / "cv")
                # generous: a step of the LM's or flow decoder's configs holds at most a few dozen rows
                train = repeated(args.train_data, 100 * (short + args.steps), root / "train")
            except CosyError as err:
                parser.error(f"--train-data: {err}")
            what = f"{args.config} on {args.train_data}"
        else:
            train = write_list(root / "train", BATCH * (short + args.steps))
            cv = write_list(root / "cv", 1)
            what = f"small transformer: 4 layers, d 256, batch {BATCH} x {FRAMES} frames"
        warmup = root / "warmup"
        warmup.mkdir()
        print(f"{what}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}")

        def experiment() -> tuple[ExperimentConfig, Task]:
            return load_experiment(args.config, args.overrides) if args.config else small_transformer()

        # CPU seconds stay meaningful when other jobs share the cores; wall time does not
        for precision in args.precisions:
            # an untimed run first: the one-off costs of a precision (CUDA kernels loaded and
            # tuned on first use) would otherwise land in one timed run and not in the other
            seconds_for(experiment(), short, precision, warmup, train, cv)
            short_wall, short_cpu = seconds_for(experiment(), short, precision, root, train, cv)
            long_wall, long_cpu = seconds_for(experiment(), short + args.steps, precision, root, train, cv)
            wall, cpu = long_wall - short_wall, long_cpu - short_cpu
            print(f"{precision:5s} {args.steps / wall:6.2f} steps/s  ({1000 * wall / args.steps:7.1f} ms/step wall, "
                  f"{cpu / args.steps:6.2f} CPU-s/step)")


if __name__ == "__main__":
    main()
