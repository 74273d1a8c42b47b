"""YAML <-> dataclasses.

Every config in cosy is a dataclass; a YAML file maps onto it one-to-one. Unknown or
misspelt keys are errors that name the full key path, and `section.key=value`
overrides from the command line are applied before conversion, so they are checked
the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cosy.errors import CosyError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from nested dicts; `where` is the key path used in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CosyError(f"config key '{where or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        path = ", ".join(f"'{_join(where, k)}'" for k in unknown)
        raise CosyError(f"unknown config key {path} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain Python data (dicts, lists, scalars) for a dataclass instance."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to nested dict `data`, in place."""
    for item in overrides:
        if "=" not in item:
            raise CosyError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:  # absent, or a section left empty in the YAML
                child = node[part] = {}
            if not isinstance(child, dict):
                raise CosyError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CosyError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CosyError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CosyError(f"config file {path} must hold a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read YAML `path` into dataclass `cls`, applying `overrides` first."""
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return from_dict(cls, data)
    except CosyError as err:
        raise CosyError(f"{path}: {err}") from err


def dumps(obj: Any) -> str:
    """YAML text of dataclass `obj`, which `load` reads back."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except CosyError as err:
                errors.append(str(err))
        raise CosyError(errors[0] if len(errors) == 1 else f"config key '{where}': {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise CosyError(f"config key '{where}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise CosyError(f"config key '{where}' must have {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise CosyError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise CosyError(f"config key '{where}' must be one of {list(args)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CosyError(f"config key '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CosyError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise CosyError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise CosyError(f"config key '{where}' must be a string, got {value!r}")
        return value
    return value
