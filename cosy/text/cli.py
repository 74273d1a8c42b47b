"""`cosy text bpe`: train the byte-level BPE text tokenizer of a recipe on the
transcripts of its training data dirs."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cosy.data.kaldi import Problem, read_entries
from cosy.errors import CosyError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True,
                        help="Kaldi data dir whose `text` is learnt from (repeat for several)")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="tokens including the special tokens and the 256 bytes")
    parser.add_argument("--min-frequency", type=int, default=2, help="rarest pair that may be merged")
    parser.add_argument("--out", required=True, help="tokenizer.json to write")


def transcripts(data_dirs: list[str]) -> list[str]:
    """The transcripts of every dir's `text`, without their utterance ids."""
    lines = []
    for data in data_dirs:
        table = Path(data) / "text"
        if not table.is_file():
            raise CosyError(f"--data {data}: no `text` file in it")
        problems: list[Problem] = []
        lines += [entry.value for entry in read_entries(table, problems) if entry.value]
        if problems:
            shown = "\n  ".join(str(p) for p in problems[:10])
            raise CosyError(f"--data {data}: {len(problems)} bad line(s) in its text file:\n  {shown}")
    if not lines:
        raise CosyError(f"--data {', '.join(data_dirs)}: no transcripts to learn from")
    return lines


def run(args: argparse.Namespace) -> int:
    from cosy.text.bpe import TextTokenizer

    lines = transcripts(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "text.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = TextTokenizer.train([corpus], args.vocab_size, args.min_frequency)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.vocab_size} tokens learnt from {len(lines)} transcripts")
    return 0
