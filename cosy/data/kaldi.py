"""Kaldi-style data directories: read, write and validate.

A data dir is a folder of small text tables keyed by utterance (or speaker) id; the
layout is described in docs/design.md. `validate` collects every problem it can find,
each naming its file and line, so that a user fixes a broken dir in one pass instead of
one error at a time. `DataDir.load` runs the same checks (without opening the audio) and
refuses a dir that has problems.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from cosy.errors import CosyError

REQUIRED = ("wav.scp", "text", "utt2spk")
OPTIONAL_UTT_TABLES = ("utt2lang", "utt2dur")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data dir; `line` is 1-based, 0 for the file as a whole."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class Entry:
    line: int
    key: str
    value: str


@dataclass
class DataDir:
    """The tables of one data dir as dicts keyed by id; audio paths are absolute."""

    wav: dict[str, str]
    text: dict[str, str]
    utt2spk: dict[str, str]
    utt2lang: dict[str, str] | None = None
    utt2dur: dict[str, float] | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def utts(self) -> list[str]:
        return sorted(self.wav)

    @property
    def spk2utt(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for utt in self.utts:
            out.setdefault(self.utt2spk[utt], []).append(utt)
        return dict(sorted(out.items()))

    def subset(self, utts: list[str]) -> "DataDir":
        """The same dir restricted to `utts`."""
        def pick(table):
            return None if table is None else {u: table[u] for u in utts}
        return DataDir(pick(self.wav), pick(self.text), pick(self.utt2spk), pick(self.utt2lang),
                       pick(self.utt2dur), self.path)

    def sample(self, fraction: float, seed: int = 0) -> "DataDir":
        """A random `fraction` of every speaker's utterances (at least one each), so that a
        smaller training set keeps all the speakers of the full one."""
        if not 0 < fraction <= 1:
            raise CosyError(f"--fraction must be in (0, 1], got {fraction}")
        rng = random.Random(seed)
        keep = []
        for utts in self.spk2utt.values():
            keep += rng.sample(utts, max(1, round(fraction * len(utts))))
        return self.subset(sorted(keep))

    @classmethod
    def load(cls, path: str | Path) -> "DataDir":
        """Read a data dir; raises CosyError listing its problems (audio is not opened)."""
        path = Path(path)
        problems = validate(path, check_audio=False)
        if problems:
            shown = "\n  ".join(str(p) for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise CosyError(f"data dir {path} has {len(problems)} problem(s) "
                            f"(run `cosy data validate {path}`):\n  {shown}{more}")
        tables = {name: _table(path, name) for name in REQUIRED + OPTIONAL_UTT_TABLES}
        lang, dur = tables["utt2lang"], tables["utt2dur"]
        return cls(
            wav={k: str(_resolve(path, v)) for k, v in tables["wav.scp"].items()},
            text=tables["text"],
            utt2spk=tables["utt2spk"],
            utt2lang=lang,
            utt2dur=None if dur is None else {k: float(v) for k, v in dur.items()},
            path=path,
        )

    def save(self, path: str | Path) -> None:
        """Write every table (and spk2utt) sorted byte-wise by id."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_table(path / "wav.scp", self.wav)
        write_table(path / "text", self.text)
        write_table(path / "utt2spk", self.utt2spk)
        write_table(path / "spk2utt", {s: " ".join(u) for s, u in self.spk2utt.items()})
        if self.utt2lang is not None:
            write_table(path / "utt2lang", self.utt2lang)
        if self.utt2dur is not None:
            write_table(path / "utt2dur", {k: f"{v:.4f}" for k, v in self.utt2dur.items()})


def write_table(path: str | Path, table: dict[str, str]) -> None:
    """Write `<key> <value>` lines sorted byte-wise by key (UTF-8)."""
    for key in table:
        if not key or any(c.isspace() for c in key):
            raise CosyError(f"{path}: id {key!r} is empty or contains whitespace")
    # Python orders str by code point, which is the byte order of their UTF-8 encoding.
    lines = [f"{k} {table[k]}".rstrip() + "\n" for k in sorted(table)]
    Path(path).write_text("".join(lines), encoding="utf-8")


def read_entries(path: Path, problems: list[Problem]) -> list[Entry]:
    """Parse `<key> <value>` lines, appending a Problem for each bad line."""
    entries = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(str(path), number, f"not valid UTF-8 (byte {err.start})"))
            continue
        text = text.rstrip("\r")
        if not text.strip():
            if number < len(lines):  # the newline at the end of the file is fine
                problems.append(Problem(str(path), number, "empty line"))
            continue
        if text[0].isspace():
            problems.append(Problem(str(path), number, "line starts with whitespace (expected an id)"))
            continue
        parts = text.split(maxsplit=1)
        entries.append(Entry(number, parts[0], parts[1].strip() if len(parts) > 1 else ""))
    return entries


@dataclass
class Report:
    """What `check` found: problems, and the size of the dir."""

    problems: list[Problem]
    num_utts: int
    num_speakers: int
    seconds: float


def validate(path: str | Path, check_audio: bool = True) -> list[Problem]:
    """Every problem of the data dir at `path`, each naming its file and line."""
    return check(path, check_audio).problems


def check(path: str | Path, check_audio: bool = True) -> Report:
    """Validate a data dir and measure it (hours come from the audio headers)."""
    path = Path(path)
    if not path.is_dir():
        raise CosyError(f"data dir not found: {path}")
    problems: list[Problem] = []
    tables: dict[str, dict[str, Entry]] = {}
    for name in REQUIRED + OPTIONAL_UTT_TABLES + ("spk2utt",):
        file = path / name
        if not file.is_file():
            if name in REQUIRED:
                problems.append(Problem(str(file), 0, "required file is missing"))
            continue
        tables[name] = _check_table(file, read_entries(file, problems), problems)

    # wav.scp is the list of utterances; every other table is compared with it once,
    # so that one missing id is reported once and at the line where it does appear.
    wav = tables.get("wav.scp")
    for name in REQUIRED[1:] + OPTIONAL_UTT_TABLES:
        if wav is None or name not in tables:
            continue
        for key, entry in tables[name].items():
            if key not in wav:
                problems.append(Problem(str(path / name), entry.line, f"utterance '{key}' has no entry in wav.scp"))
        for key, entry in wav.items():
            if key not in tables[name]:
                problems.append(Problem(str(path / "wav.scp"), entry.line, f"utterance '{key}' has no entry in {name}"))

    if "text" in tables:
        for key, entry in tables["text"].items():
            if not entry.value:
                problems.append(Problem(str(path / "text"), entry.line, f"utterance '{key}' has an empty transcript"))
    if "utt2dur" in tables:
        for key, entry in tables["utt2dur"].items():
            if not _is_positive_number(entry.value):
                problems.append(Problem(str(path / "utt2dur"), entry.line,
                                        f"duration of '{key}' must be a positive number of seconds, got {entry.value!r}"))
    for name in ("utt2spk", "utt2lang"):
        for key, entry in tables.get(name, {}).items():
            if not entry.value or len(entry.value.split()) != 1:
                problems.append(Problem(str(path / name), entry.line,
                                        f"malformed line: expected '<utt> <one token>', got {entry.value!r} for '{key}'"))
    if "spk2utt" in tables and "utt2spk" in tables:
        problems += _check_spk2utt(path, tables["spk2utt"], tables["utt2spk"])

    seconds = 0.0
    for key, entry in tables.get("wav.scp", {}).items():
        problem, duration = _check_audio(path, entry, check_audio)
        if problem:
            problems.append(problem)
        seconds += duration
    speakers = {e.value for e in tables.get("utt2spk", {}).values()}
    return Report(problems, len(tables.get("wav.scp", {})), len(speakers), seconds)


def _check_table(file: Path, entries: list[Entry], problems: list[Problem]) -> dict[str, Entry]:
    """Keyed entries of one table; reports duplicate and unsorted ids."""
    table: dict[str, Entry] = {}
    previous = None
    unsorted_reported = False
    for entry in entries:
        if entry.key in table:
            problems.append(Problem(str(file), entry.line,
                                    f"duplicate id '{entry.key}' (first on line {table[entry.key].line})"))
            continue
        if previous is not None and entry.key < previous and not unsorted_reported:
            problems.append(Problem(str(file), entry.line,
                                    f"ids are not sorted (LC_ALL=C sort): '{entry.key}' after '{previous}'"))
            unsorted_reported = True
        table[entry.key] = entry
        previous = entry.key
    return table


def _check_spk2utt(path: Path, spk2utt: dict[str, Entry], utt2spk: dict[str, Entry]) -> list[Problem]:
    file = str(path / "spk2utt")
    problems = []
    listed = set()
    for spk, entry in spk2utt.items():
        for utt in entry.value.split():
            listed.add(utt)
            if utt not in utt2spk:
                problems.append(Problem(file, entry.line, f"utterance '{utt}' has no entry in utt2spk"))
            elif utt2spk[utt].value != spk:
                problems.append(Problem(file, entry.line,
                                        f"utterance '{utt}' is listed under '{spk}' but utt2spk says "
                                        f"'{utt2spk[utt].value}'"))
    for utt, entry in utt2spk.items():
        if utt not in listed:
            problems.append(Problem(str(path / "utt2spk"), entry.line, f"utterance '{utt}' is not listed in spk2utt"))
    return problems


def _check_audio(path: Path, entry: Entry, open_file: bool) -> tuple[Problem | None, float]:
    file = str(path / "wav.scp")
    if not entry.value:
        return Problem(file, entry.line, f"malformed line: no audio path for '{entry.key}'"), 0.0
    if entry.value.endswith("|"):
        return Problem(file, entry.line, f"pipe commands are not supported: {entry.value!r}"), 0.0
    audio = _resolve(path, entry.value)
    if not open_file:
        return None, 0.0
    if not audio.is_file():
        return Problem(file, entry.line, f"audio file not found: {audio}"), 0.0
    try:
        info = sf.info(str(audio))
    except Exception as err:  # soundfile raises several types for bad files
        return Problem(file, entry.line, f"cannot read audio {audio}: {err}"), 0.0
    if info.frames == 0:
        return Problem(file, entry.line, f"audio file {audio} has no samples"), 0.0
    return None, info.frames / info.samplerate


def _table(path: Path, name: str) -> dict[str, str] | None:
    file = path / name
    if not file.is_file():
        return None
    return {e.key: e.value for e in read_entries(file, [])}


def _resolve(data_dir: Path, audio: str) -> Path:
    audio_path = Path(audio)
    return audio_path if audio_path.is_absolute() else (data_dir / audio_path).resolve()


def _is_positive_number(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and number > 0
