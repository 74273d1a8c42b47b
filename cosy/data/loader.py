"""Streaming Parquet shards into training batches.

The pipeline for one epoch, run inside each loader worker:

    shard list -> this part's shards (or rows) -> rows -> task processors
        -> shuffle buffer -> sort buffer -> batches by frames or count -> task collate

A "part" is one (rank, worker) pair. With at least as many shards as parts, each part
reads whole shards; otherwise every part reads every shard and keeps every P-th row, so
no two parts ever see the same utterance in an epoch.

Everything random is seeded from (seed, epoch, part) or (seed, epoch, utterance), so an
epoch is the same sequence of batches on every run with the same number of parts, and a
resumed run can skip to the exact batch where it stopped. Other numbers of processes or
workers deal the rows to other parts, so the order of the batches changes.
"""

from __future__ import annotations

import logging
import random
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cosy.data.shards import read_list
from cosy.errors import CosyError
from cosy.train.task import Row, Task, process_row

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The `data:` section of an experiment config.

    batch_type: "dynamic" packs rows until the padded batch (rows x longest row) would
        exceed `max_frames_in_batch`; "static" takes `batch_size` rows.
    shuffle_size / sort_size: buffer lengths in rows; sorting by length within a sort
        buffer keeps padding low.
    """

    shuffle: bool = True
    shuffle_size: int = 1000
    sort: bool = True
    sort_size: int = 500
    batch_type: Literal["dynamic", "static"] = "dynamic"
    max_frames_in_batch: int = 12000
    batch_size: int = 16
    num_workers: int = 0
    prefetch: int = 2
    seed: int = 1234


@dataclass
class BatchInfo:
    """What the trainer logs about a batch besides its tensors."""

    rows: int
    frames: int


class ShardDataset(IterableDataset):
    """Batches of one epoch of the shards in `list_path`, for one rank.

    Yields `(batch, BatchInfo)` where `batch` is `task.collate(rows)`. Iterate it
    through `make_loader`, which sets the epoch and can skip the batches a resumed run
    has already trained on.
    """

    def __init__(self, list_path: str | Path, task: Task, model_config: Any, config: DataConfig,
                 train: bool, rank: int = 0, world_size: int = 1):
        self.list_path = str(list_path)
        self.shards = read_list(list_path)
        self.task = task
        self.processors = task.processors(model_config, train)
        self.config = config
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[dict, BatchInfo]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part = self.rank * workers + worker
        rows = self._process(self._read(part, self.world_size * workers))
        if self.train and self.config.shuffle:
            rows = _shuffle(rows, self.config.shuffle_size, random.Random(self._seed("shuffle", part)))
        if self.config.sort:
            rows = _sort(rows, self.config.sort_size, self.task.num_frames)
        for batch in self._batch(rows):
            yield self.task.collate(batch), BatchInfo(len(batch), sum(self.task.num_frames(r) for r in batch))

    def _seed(self, *parts: Any) -> int:
        return zlib.crc32(repr((self.config.seed, self.epoch) + parts).encode())

    def _read(self, part: int, parts: int) -> Iterator[Row]:
        shards = list(self.shards)
        if self.train and self.config.shuffle:
            random.Random(self._seed("shards")).shuffle(shards)
        by_row = len(shards) < parts
        mine = shards if by_row else shards[part::parts]
        index = 0
        for shard in mine:
            try:
                table = pq.ParquetFile(shard)
                batches = table.iter_batches(batch_size=256)
                for record_batch in batches:
                    for row in record_batch.to_pylist():
                        if not by_row or index % parts == part:
                            yield row
                        index += 1
            except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
                raise CosyError(f"cannot read shard {shard}: {err}") from err

    def _process(self, rows: Iterator[Row]) -> Iterator[Row]:
        for row in rows:
            utt = row.get("utt", "?")
            try:
                with _seeded(self._seed("row", utt)):
                    row = process_row(self.processors, row)
            except Exception as err:  # one bad utterance (corrupt audio...) must not stop the job
                log.warning("skipping utterance %s: %s: %s", utt, type(err).__name__, err)
                continue
            if row is not None:
                yield row

    def _batch(self, rows: Iterator[Row]) -> Iterator[list[Row]]:
        config = self.config
        batch: list[Row] = []
        longest = 0
        for row in rows:
            frames = self.task.num_frames(row)
            if config.batch_type == "static":
                full = len(batch) == config.batch_size
            else:  # padded size, not the sum of lengths, is what fills memory
                full = bool(batch) and max(longest, frames) * (len(batch) + 1) > config.max_frames_in_batch
            if full:
                yield batch
                batch, longest = [], 0
            batch.append(row)
            longest = max(longest, frames)
        if batch:
            yield batch


def make_loader(dataset: ShardDataset, epoch: int, skip: int = 0) -> Iterator[tuple[dict, BatchInfo]]:
    """Iterate one epoch of `dataset` from batch `skip` on.

    The DataLoader gets its own generator so that creating it does not draw from the
    global torch RNG, which belongs to the model (dropout) and is checkpointed.
    """
    dataset.set_epoch(epoch)
    workers = dataset.config.num_workers
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                        generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
                        prefetch_factor=dataset.config.prefetch if workers else None,
                        persistent_workers=False)
    for index, item in enumerate(loader):
        if index >= skip:
            yield item


def _identity(item: Any) -> Any:
    return item


def _shuffle(rows: Iterator[Row], size: int, rng: random.Random) -> Iterator[Row]:
    buffer: list[Row] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            # swap a random row to the end and emit it: O(1) per row
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _sort(rows: Iterator[Row], size: int, key) -> Iterator[Row]:
    buffer: list[Row] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            yield from sorted(buffer, key=key)
            buffer = []
    yield from sorted(buffer, key=key)


@contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch (CPU) RNGs for a processor call, then restore them.

    Processors may use any of the three for augmentation; seeding them per utterance
    makes an epoch reproducible without disturbing the training RNG of the process.
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
