"""Checkpoints of an experiment directory.

Each checkpoint is `step_<N>.safetensors` (the model's state_dict), optionally
`step_<N>.ema.safetensors` (EMA weights), and `step_<N>.state.pt` (everything else needed
to continue: optimisers, schedulers, scaler, RNG states, step, epoch, data position);
under DeepSpeed the optimiser state is the folder `step_<N>.deepspeed/` (one partition per
rank, and DeepSpeed's own copy of the module's weights).
`checkpoints.yaml` lists the complete checkpoints with their validation loss; it is
rewritten only after a checkpoint's files are on disk, so an entry in it is always
complete. Every file is written atomically: a temporary file in the same folder,
fsync, then `os.replace`.
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save as save_safetensors_bytes

from cosy.errors import CosyError

INDEX = "checkpoints.yaml"


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes owner-only files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself is durable only once the directory is synced
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a state_dict as safetensors; tied (shared) tensors are stored once per key."""
    seen: set[int] = set()
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    atomic_write(path, save_safetensors_bytes(tensors))


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(value: Any) -> Any:
    # random.setstate insists on tuples; a round trip may hand back lists
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class Entry:
    step: int
    epoch: int
    cv_loss: float | None

    @property
    def weights(self) -> str:
        return f"step_{self.step}.safetensors"

    @property
    def ema(self) -> str:
        return f"step_{self.step}.ema.safetensors"

    @property
    def state(self) -> str:
        return f"step_{self.step}.state.pt"

    @property
    def deepspeed(self) -> str:
        return f"step_{self.step}.deepspeed"


class Checkpoints:
    """The checkpoints of one experiment directory and their index."""

    def __init__(self, expdir: str | Path):
        self.dir = Path(expdir)
        self.entries = self._read_index()

    def _read_index(self) -> list[Entry]:
        path = self.dir / INDEX
        if not path.is_file():
            return []
        try:
            items = yaml.safe_load(path.read_text()) or []
            return [Entry(int(i["step"]), int(i["epoch"]), i.get("cv_loss")) for i in items]
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
            raise CosyError(f"checkpoint index {path} is malformed: {err}") from err

    def _write_index(self) -> None:
        atomic_write(self.dir / INDEX, yaml.safe_dump([asdict(e) for e in self.entries], sort_keys=False).encode())

    def save(self, entry: Entry, weights: dict[str, torch.Tensor], state: dict[str, Any],
             ema: dict[str, torch.Tensor] | None, keep_last: int, keep_best: int) -> None:
        """Write one checkpoint, index it, then delete those neither recent nor best."""
        save_weights(self.dir / entry.weights, weights)
        if ema is not None:
            save_weights(self.dir / entry.ema, ema)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.dir / entry.state, buffer.getvalue())
        self.entries = [e for e in self.entries if e.step != entry.step] + [entry]
        self.entries.sort(key=lambda e: e.step)
        keep = {e.step for e in self.entries[-max(1, keep_last):]}
        keep |= {e.step for e in self.best(keep_best)}
        dropped = [e for e in self.entries if e.step not in keep]
        self.entries = [e for e in self.entries if e.step in keep]
        self._write_index()
        for old in dropped:
            for name in (old.weights, old.ema, old.state):
                (self.dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.dir / old.deepspeed, ignore_errors=True)

    def remove_unindexed_deepspeed_folders(self) -> None:
        """Delete DeepSpeed folders that no index entry names: a save killed half-way."""
        named = {e.deepspeed for e in self.entries}
        for folder in self.dir.glob("step_*.deepspeed"):
            if folder.name not in named:
                shutil.rmtree(folder)

    def latest(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    def best(self, n: int) -> list[Entry]:
        """Up to `n` entries with the lowest validation loss, best first; a NaN or infinite
        loss (a diverged step) counts as no loss, as it would not sort."""
        scored = [e for e in self.entries if e.cv_loss is not None and math.isfinite(e.cv_loss)]
        return sorted(scored, key=lambda e: (e.cv_loss, -e.step))[:n] if n > 0 else []

    def load_state(self, entry: Entry) -> dict[str, Any]:
        path = self.dir / entry.state
        if not path.is_file():
            raise CosyError(f"training state not found: {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
