"""Shard loading: splitting across ranks and workers, buffers, batching, resume, bad rows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cosy.data.loader import DataConfig, ShardDataset, make_loader
from cosy.data.shards import read_list
from cosy.errors import CosyError
from toy_task import TASK, ToyConfig, make_rows, write_shards


def dataset(listing: Path, rank: int = 0, world_size: int = 1, train: bool = True, **data) -> ShardDataset:
    return ShardDataset(listing, TASK, ToyConfig(), DataConfig(**data), train, rank, world_size)


def utts(batches) -> list[str]:
    return [u for batch, _ in batches for u in batch["utts"]]


@pytest.mark.parametrize("rows_per_shard", [5, 40], ids=["by_shard", "by_row"])
def test_ranks_and_workers_together_see_every_utterance_exactly_once(tmp_path, rows_per_shard):
    # 8 shards >= 2 ranks x 2 workers: whole shards; 1 shard < 4 parts: split by rows
    listing = write_shards(tmp_path, make_rows(40), rows_per_shard)
    seen = []
    for rank in range(2):
        parts = utts(make_loader(dataset(listing, rank, 2, num_workers=2, shuffle_size=4, sort_size=3), epoch=1))
        assert parts, rank
        seen += parts
    assert sorted(seen) == [f"utt{i:04d}" for i in range(40)]


def test_epochs_are_shuffled_differently_but_reproducibly(tmp_path):
    listing = write_shards(tmp_path, make_rows(40), 5)
    data = dataset(listing, shuffle_size=8, sort=False, batch_type="static", batch_size=4)
    first = utts(make_loader(data, epoch=0))
    assert first == utts(make_loader(data, epoch=0))
    second = utts(make_loader(data, epoch=1))
    assert first != second and sorted(first) == sorted(second)
    # validation data keeps the file order
    plain = utts(make_loader(dataset(listing, train=False, sort=False), epoch=0))
    assert plain == [f"utt{i:04d}" for i in range(40)]


def test_processor_randomness_is_seeded_per_utterance_not_by_process_state(tmp_path):
    listing = write_shards(tmp_path, make_rows(12), 12)
    data = dataset(listing, shuffle=False, sort=False, batch_type="static", batch_size=12)
    torch.manual_seed(0)
    a = next(iter(make_loader(data, epoch=0)))[0]["target"]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    b = next(iter(make_loader(data, epoch=0)))[0]["target"]
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())  # the process's RNG is left untouched
    c = next(iter(make_loader(data, epoch=1)))[0]["target"]
    assert not torch.equal(a, c)  # fresh augmentation each epoch


def test_dynamic_batches_respect_the_padded_frame_budget_and_sort_by_length(tmp_path):
    listing = write_shards(tmp_path, make_rows(60), 20)
    budget = 24
    batches = list(make_loader(dataset(listing, max_frames_in_batch=budget, sort_size=60, shuffle=False), epoch=0))
    assert len(utts(batches)) == 60
    for batch, info in batches:
        padded = batch["tokens"].shape[0] * batch["tokens"].shape[1]
        assert padded <= budget
        assert info.rows == batch["tokens"].shape[0] and info.frames == int(batch["lengths"].sum())
    # a sort buffer over all rows: lengths never decrease across batches
    lengths = [int(n) for batch, _ in batches for n in batch["lengths"]]
    assert lengths == sorted(lengths)
    # the budget is used: adding the next row would have broken it
    for (batch, _), (following, _) in zip(batches, batches[1:]):
        longest = max(batch["tokens"].shape[1], int(following["lengths"][0]))
        assert longest * (batch["tokens"].shape[0] + 1) > budget


def test_static_batches_have_batch_size_rows(tmp_path):
    listing = write_shards(tmp_path, make_rows(23), 10)
    sizes = [info.rows for _, info in make_loader(dataset(listing, batch_type="static", batch_size=5), epoch=0)]
    assert sizes == [5, 5, 5, 5, 3]


def test_skipping_batches_continues_exactly_where_a_run_stopped(tmp_path):
    listing = write_shards(tmp_path, make_rows(40), 5)
    data = dataset(listing, max_frames_in_batch=20, shuffle_size=6, sort_size=4, num_workers=2)
    full = list(make_loader(data, epoch=3))
    rest = list(make_loader(data, epoch=3, skip=4))
    assert len(rest) == len(full) - 4
    for (a, _), (b, _) in zip(full[4:], rest):
        assert a["utts"] == b["utts"] and torch.equal(a["target"], b["target"])


def test_dropped_and_failing_rows_are_skipped_and_failures_logged(tmp_path, caplog):
    rows = make_rows(6)
    rows[1]["text"] = "drop"
    rows[4]["text"] = "bad"
    listing = write_shards(tmp_path, rows, 6)
    with caplog.at_level(logging.WARNING, logger="cosy.data.loader"):
        seen = utts(make_loader(dataset(listing, shuffle=False, sort=False), epoch=0))
    assert seen == ["utt0000", "utt0002", "utt0003", "utt0005"]
    assert "utt0004" in caplog.text and "corrupt row" in caplog.text
    assert "utt0001" not in caplog.text


def test_missing_empty_or_broken_shard_lists_fail_naming_the_file(tmp_path):
    with pytest.raises(CosyError, match="shard list not found: .*nothing.list"):
        read_list(tmp_path / "nothing.list")
    (tmp_path / "empty.list").write_text("\n")
    with pytest.raises(CosyError, match="empty.list is empty"):
        read_list(tmp_path / "empty.list")
    listing = write_shards(tmp_path / "a", make_rows(4), 2)
    missing = listing.read_text().split()[1]
    Path(missing).unlink()
    with pytest.raises(CosyError, match=f"shard file not found: {missing} \\(line 2"):
        read_list(listing)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    (tmp_path / "broken.list").write_text(f"{broken}\n")
    with pytest.raises(CosyError, match="cannot read shard .*broken.parquet"):
        list(make_loader(dataset(tmp_path / "broken.list"), epoch=0))

