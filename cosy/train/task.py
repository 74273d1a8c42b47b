"""What the training engine needs to know about a model family.

Each model package defines one `Task` in its `task.py` (for example `cosy/flow/task.py`
defines `TASK`); `cosy/train/tasks.py` maps task names to those objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

Row = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """A model family as the trainer sees it.

    name: the value of `task:` in an experiment config.
    config_cls: the dataclass of the config's `model:` section.
    build: model config -> `nn.Module` whose `forward(batch)` returns a dict of scalar
        loss terms with the key `loss` (GAN tasks: `forward(batch, turn=...)`, see
        docs/design.md).
    processors: (model config, training?) -> functions applied in order to each shard
        row; each returns the transformed row, or None to drop it.
    collate: list of processed rows -> batch dict of padded tensors (with lengths).
    num_frames: processed row -> its size for dynamic batching (frames or tokens).
    gan: True when the model is trained adversarially (two optimisers).
    training_only: prefixes of submodules that only training uses (an auxiliary
        classifier): a `train.init` checkpoint may lack them or hold them where the
        model has none.
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    processors: Callable[[Any, bool], list[Callable[[Row], Row | None]]]
    collate: Callable[[list[Row]], dict[str, Any]]
    num_frames: Callable[[Row], int]
    gan: bool = False
    training_only: tuple[str, ...] = ()


def process_row(processors: list[Callable[[Row], Row | None]], row: Row) -> Row | None:
    """`row` through `processors` in order; None as soon as one of them drops it."""
    for fn in processors:
        row = fn(row)
        if row is None:
            return None
    return row
