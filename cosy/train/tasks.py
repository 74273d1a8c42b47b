"""Task names -> Task objects.

Model packages are imported only when their task is asked for, so training one model
never imports the others. A name of the form `module:ATTR` loads a Task from any
importable module, which is how tests and user experiments add their own tasks from
a config file; `register_task` adds one from Python.
"""

from __future__ import annotations

import importlib

from cosy.errors import CosyError
from cosy.train.task import Task

BUILTIN = {
    "tokenizer": "cosy.tokenizer.task:TASK",
    "speaker": "cosy.speaker.task:TASK",
    "llm": "cosy.llm.task:TASK",
    "flow": "cosy.flow.task:TASK",
    "vocoder": "cosy.vocoder.task:TASK",
}

_registered: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Make `task` available under `task.name` (replacing a task of that name)."""
    _registered[task.name] = task


def known_tasks() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered))


def get_task(name: str) -> Task:
    """The Task called `name`, or loaded from `module:ATTR`; CosyError when there is none."""
    if name in _registered:
        return _registered[name]
    target = BUILTIN.get(name, name if ":" in name else None)
    if target is None:
        raise CosyError(f"unknown task '{name}' (known tasks: {', '.join(known_tasks())}, or module:ATTR)")
    module_name, attr = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # a dependency of the task module is missing: show the real cause
        raise CosyError(f"task '{name}': module {module_name} not found") from err
    task = getattr(module, attr, None)
    if not isinstance(task, Task):
        raise CosyError(f"task '{name}': {module_name}.{attr} is not a cosy.train.task.Task")
    return task
