#!/usr/bin/env python3
"""LibriTTS subsets -> one Kaldi data dir.

    python local/data_prep.py LibriTTS/train-clean-100 LibriTTS/train-clean-360 data/train

LibriTTS is laid out as SUBSET/SPEAKER/CHAPTER/<utt>.wav with the normalised transcript
in <utt>.normalized.txt beside each wav (utterance ids look like 19_198_000000_000003, so
they start with their speaker and sort by speaker). The data dir gets wav.scp (absolute
paths), text, utt2spk, spk2utt, utt2lang (en) and utt2dur. A wav without a transcript, an
empty transcript or a wav whose header cannot be read is reported on stderr and left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf

from cosy.data.kaldi import DataDir
from cosy.errors import CosyError


def scan_subset(subset: Path, data: DataDir) -> int:
    """Add the utterances of one subset to `data`; returns how many were left out."""
    if not subset.is_dir():
        raise CosyError(f"LibriTTS subset folder not found: {subset}")
    wavs = sorted(subset.glob("*/*/*.wav"))
    if not wavs:
        raise CosyError(f"{subset}: no SPEAKER/CHAPTER/*.wav files: is this a LibriTTS subset folder?")
    left_out = 0
    for wav in wavs:
        utt, spk = wav.stem, wav.parent.parent.name
        transcript = wav.with_suffix(".normalized.txt")
        problem = None
        if not transcript.is_file():
            problem = f"no transcript {transcript.name}"
        else:
            text = " ".join(transcript.read_text(encoding="utf-8").split())
            if not text:
                problem = f"empty transcript {transcript}"
        if problem is None:
            try:
                seconds = sf.info(str(wav)).duration
            except Exception as err:  # soundfile raises several types for a bad header
                problem = f"unreadable audio ({err})"
        if problem is None and utt in data.wav:
            problem = f"utterance id also in {data.wav[utt]}"
        if problem is not None:
            print(f"left out {utt} ({wav}): {problem}", file=sys.stderr)
            left_out += 1
            continue
        data.wav[utt], data.text[utt], data.utt2spk[utt] = str(wav.resolve()), text, spk
        data.utt2lang[utt], data.utt2dur[utt] = "en", seconds
    return left_out


def prepare(subsets: list[Path], out: Path) -> DataDir:
    data = DataDir(wav={}, text={}, utt2spk={}, utt2lang={}, utt2dur={})
    left_out = sum(scan_subset(subset, data) for subset in subsets)
    if not data.wav:
        raise CosyError(f"no usable utterance in {', '.join(map(str, subsets))}")
    data.save(out)
    hours = sum(data.utt2dur.values()) / 3600
    print(f"{out}: {len(data.wav)} utterances, {len(data.spk2utt)} speakers, {hours:.2f} hours; "
          f"left out {left_out}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("subsets", nargs="+", type=Path, help="LibriTTS subset folders (e.g. LibriTTS/dev-clean)")
    parser.add_argument("out", type=Path, help="data dir to write")
    args = parser.parse_args(argv)
    try:
        prepare(args.subsets, args.out)
    except CosyError as err:
        print(f"data_prep.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
