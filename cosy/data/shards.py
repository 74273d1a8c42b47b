"""Parquet shards of a data dir, the trainer's input (schema in docs/design.md).

Each row carries the original audio file's bytes, so a shard is self-contained and
the trainer never touches the data dir. Audio that cannot be decoded is reported with
its utterance id and left out; it never stops the job.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from cosy.audio import load_audio
from cosy.data.kaldi import DataDir
from cosy.errors import CosyError

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    pa.field("utt", pa.string(), nullable=False),
    pa.field("spk", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("lang", pa.string()),
    pa.field("audio", pa.binary(), nullable=False),
    pa.field("duration", pa.float64(), nullable=False),
    pa.field("speech_token", pa.list_(pa.int32())),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("spk_embedding", pa.list_(pa.float32())),
])

# column -> (data dir file, whether it is keyed by speaker rather than utterance)
FEATURES = {
    "speech_token": ("utt2speech_token.safetensors", False),
    "embedding": ("utt2embedding.safetensors", False),
    "spk_embedding": ("spk2embedding.safetensors", True),
}


@dataclass
class Skipped:
    utt: str
    path: str
    reason: str


@dataclass
class ShardResult:
    shards: list[Path] = field(default_factory=list)
    rows: int = 0
    skipped: list[Skipped] = field(default_factory=list)


def write_shards(data_dir: str | Path, out: str | Path, utts_per_shard: int = 1000,
                 num_workers: int = 1, seed: int | None = 0) -> ShardResult:
    """Write `out/shard_%05d.parquet` and `out/data.list` (absolute shard paths).

    Utterances go to shards in an order shuffled by `seed` (None: the data dir's order).
    A data dir is sorted by utterance id, which usually groups a speaker's utterances, and
    training reads shards through a shuffle buffer smaller than the data: without this,
    each batch would come from the few speakers of one or two shards.
    """
    if utts_per_shard < 1:
        raise CosyError(f"--utts-per-shard must be at least 1, got {utts_per_shard}")
    if num_workers < 1:
        raise CosyError(f"--num-workers must be at least 1, got {num_workers}")
    data = DataDir.load(data_dir)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    features = {col: Path(data_dir) / name for col, (name, _) in FEATURES.items()
                if (Path(data_dir) / name).is_file()}
    utts = data.utts
    if seed is not None:
        random.Random(seed).shuffle(utts)
    jobs = [(data.subset(utts[i:i + utts_per_shard]), features, out / f"shard_{i // utts_per_shard:05d}.parquet")
            for i in range(0, len(utts), utts_per_shard)]
    if num_workers == 1 or len(jobs) == 1:
        results = [_write_one(*job) for job in jobs]
    else:
        with get_context("spawn").Pool(min(num_workers, len(jobs))) as pool:
            results = pool.starmap(_write_one, jobs)

    total = ShardResult()
    for (_, _, shard), (rows, skipped) in zip(jobs, results):
        if rows:
            total.shards.append(shard)
        total.rows += rows
        total.skipped += skipped
    for item in total.skipped:
        log.warning("skipped utterance %s (%s): %s", item.utt, item.path, item.reason)
    (out / "data.list").write_text("".join(f"{p}\n" for p in total.shards))
    return total


def _write_one(data: DataDir, features: dict[str, Path], shard: Path) -> tuple[int, list[Skipped]]:
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    skipped = []
    handles = {col: safe_open(str(path), framework="numpy") for col, path in features.items()}
    key_sets = {col: set(handle.keys()) for col, handle in handles.items()}
    for utt in data.utts:
        path = data.wav[utt]
        try:
            audio = Path(path).read_bytes()
            samples, rate = load_audio(audio)
        except (OSError, CosyError) as err:
            skipped.append(Skipped(utt, path, str(err)))
            continue
        spk = data.utt2spk[utt]
        columns["utt"].append(utt)
        columns["spk"].append(spk)
        columns["text"].append(data.text[utt])
        columns["lang"].append(data.utt2lang.get(utt) if data.utt2lang else None)
        columns["audio"].append(audio)
        columns["duration"].append(len(samples) / rate)
        for col, (_, by_speaker) in FEATURES.items():
            key = spk if by_speaker else utt
            value = handles[col].get_tensor(key).reshape(-1).tolist() if key in key_sets.get(col, ()) else None
            columns[col].append(value)
    if columns["utt"]:
        pq.write_table(pa.table(columns, schema=SCHEMA), shard)
    elif shard.exists():
        shard.unlink()
    return len(columns["utt"]), skipped


def read_shard(path: str | Path, batch_size: int = 64) -> Iterator[dict]:
    """Rows of one shard as plain dicts with the keys of SCHEMA."""
    try:
        reader = pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as err:
        raise CosyError(f"cannot read shard {path}: {err}") from err
    missing = set(SCHEMA.names) - set(reader.schema_arrow.names)
    if missing:
        raise CosyError(f"shard {path} lacks column(s) {', '.join(sorted(missing))}")
    for batch in reader.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def read_list(path: str | Path) -> list[Path]:
    """Shard paths of a `data.list` file (one per line; relative ones are taken from its
    folder); CosyError when the list is missing or empty or names a missing shard."""
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"shard list not found: {path}")
    shards = [path.parent / line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not shards:
        raise CosyError(f"shard list {path} is empty")
    for number, shard in enumerate(shards, 1):
        if not shard.is_file():
            raise CosyError(f"shard file not found: {shard} (line {number} of {path})")
    return shards
