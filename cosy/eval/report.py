"""Where the evaluation commands write their reports: PREFIX.json and PREFIX.md."""

from __future__ import annotations

import json
from pathlib import Path


def report_prefix(out: str | None, default: Path) -> Path:
    """The `--out` prefix (or `default`), with its folder made now.

    Evaluations take minutes; a report folder that cannot be made must fail before them,
    not after.
    """
    prefix = Path(out) if out else default
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return prefix


def write_report(prefix: Path, report: dict, markdown: str) -> None:
    """Write PREFIX.json and PREFIX.md.

    The suffixes are appended, not swapped in, so that a prefix with a dot in its last
    part (`eval/tts.v2`) keeps it.
    """
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{prefix}.md").write_text(markdown)
