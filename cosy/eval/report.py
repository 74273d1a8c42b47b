"""Where the evaluation commands write their reports: PREFIX.json and PREFIX.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def report_prefix(out: str | None, default: Path) -> Path:
    """The `--out` prefix, with its folder made now, or `default`, a prefix inside an
    input folder that the evaluation checks (a mistyped one must not be created).

    Evaluations take minutes; a report folder that cannot be made must fail before them,
    not after.
    """
    if not out:
        return default
    prefix = Path(out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return prefix


def write_report(prefix: Path, report: dict, markdown: str) -> None:
    """Write PREFIX.json and PREFIX.md.

    The suffixes are appended, not swapped in, so that a prefix with a dot in its last
    part (`eval/tts.v2`) keeps it.
    """
    Path(f"{prefix}.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    Path(f"{prefix}.md").write_text(markdown)


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities (a metric with nothing to average) as null, which
    strict JSON readers take."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
