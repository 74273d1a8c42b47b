"""Tiny tasks for the training-engine tests, importable by `cosy train` subprocesses.

A config names them as `task: toy_task:TASK` or `task: toy_task:GAN_TASK` with this
folder on PYTHONPATH. Rows use the shard columns of docs/design.md: `speech_token` is
the input sequence and `embedding` the regression target.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from cosy.train.task import Task

SCHEMA = pa.schema([
    ("utt", pa.string()), ("spk", pa.string()), ("text", pa.string()), ("lang", pa.string()),
    ("audio", pa.binary()), ("duration", pa.float64()), ("speech_token", pa.list_(pa.int32())),
    ("embedding", pa.list_(pa.float32())), ("spk_embedding", pa.list_(pa.float32())),
])


def make_rows(count: int, seed: int = 0, prefix: str = "utt", dim: int = 4, vocab: int = 16) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        length = rng.randint(2, 8)
        rows.append({
            "utt": f"{prefix}{i:04d}", "spk": f"spk{i % 3}", "text": "ok", "lang": "en", "audio": b"",
            "duration": length * 0.04, "speech_token": [rng.randrange(vocab) for _ in range(length)],
            "embedding": [rng.uniform(-1, 1) for _ in range(dim)], "spk_embedding": None,
        })
    return rows


def write_shards(folder: Path, rows: list[dict], per_shard: int) -> Path:
    """Parquet shards of `per_shard` rows each plus their list file; returns the list path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    chunks = [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)] or [[]]
    for index, chunk in enumerate(chunks):
        path = folder / f"shard_{index:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), path)
        paths.append(str(path.resolve()))
    listing = folder / "data.list"
    listing.write_text("".join(p + "\n" for p in paths))
    return listing


@dataclass
class ToyConfig:
    vocab: int = 16
    dim: int = 8
    out_dim: int = 4
    dropout: float = 0.1
    noise: float = 0.01  # random target noise in training: exercises seeded processors
    sleep: float = 0.0  # seconds per forward, so a test can kill a run half-way
    batch_norm: bool = False  # a BatchNorm on the output: a module with an integer buffer


def processors(config: ToyConfig, train: bool):
    def drop_marked(row):
        return None if row["text"] == "drop" else row

    def fail_marked(row):
        if row["text"] == "bad":
            raise ValueError("corrupt row")
        return row

    def to_tensors(row):
        target = torch.tensor(row["embedding"], dtype=torch.float32)
        if train and config.noise:
            target = target + config.noise * torch.randn(target.shape)
        return {"utt": row["utt"], "tokens": torch.tensor(row["speech_token"]), "target": target}

    return [drop_marked, fail_marked, to_tensors]


def collate(rows):
    lengths = torch.tensor([len(r["tokens"]) for r in rows])
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :lengths[i]] = row["tokens"]
    return {"tokens": tokens, "lengths": lengths, "target": torch.stack([r["target"] for r in rows]),
            "utts": [r["utt"] for r in rows]}


class ToyEncoder(nn.Module):
    """Tokens (batch, time) -> masked mean of embeddings -> (batch, out_dim)."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(config.dim, config.out_dim)
        self.norm = nn.BatchNorm1d(config.out_dim) if config.batch_norm else nn.Identity()

    def forward(self, tokens, lengths):
        if self.config.sleep:
            time.sleep(self.config.sleep)
        mask = (torch.arange(tokens.shape[1]) < lengths[:, None]).unsqueeze(-1)
        hidden = self.dropout(self.embed(tokens)) * mask
        return self.norm(self.proj(hidden.sum(1) / lengths[:, None]))


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.encoder = ToyEncoder(config)

    def forward(self, batch):
        pred = self.encoder(batch["tokens"], batch["lengths"])
        # per-row mean first, so a batch of 2b rows averages like two batches of b
        mse = ((pred.float() - batch["target"]) ** 2).mean(-1).mean()
        return {"loss": mse, "l1": (pred.float() - batch["target"]).abs().mean().detach()}


class ToyGan(nn.Module):
    """Generator = ToyEncoder, discriminator = a linear critic on (batch, out_dim) vectors."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.generator = ToyEncoder(config)
        self.discriminator = nn.Sequential(nn.Linear(config.out_dim, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, batch, turn):
        if turn == "discriminator":
            fake = self.generator(batch["tokens"], batch["lengths"])
            batch["fake"] = fake  # reused with its graph by the generator turn
            real_score = self.discriminator(batch["target"])
            fake_score = self.discriminator(fake.detach())
            return {"loss": ((real_score - 1) ** 2).mean() + (fake_score ** 2).mean()}
        fake = batch.pop("fake", None)
        if fake is None:
            fake = self.generator(batch["tokens"], batch["lengths"])
        if turn == "warmup":
            mse = ((fake - batch["target"]) ** 2).mean()
            return {"loss": 10 * mse, "mse": mse.detach()}
        adversarial = ((self.discriminator(fake) - 1) ** 2).mean()
        mse = ((fake - batch["target"]) ** 2).mean()
        return {"loss": adversarial + 10 * mse, "adv": adversarial.detach(), "mse": mse.detach()}


TASK = Task(name="toy", config_cls=ToyConfig, build=ToyModel, processors=processors, collate=collate,
            num_frames=lambda row: len(row["tokens"]))
GAN_TASK = Task(name="toy_gan", config_cls=ToyConfig, build=ToyGan, processors=processors, collate=collate,
                num_frames=lambda row: len(row["tokens"]), gan=True)
