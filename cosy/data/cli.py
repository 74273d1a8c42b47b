"""`cosy data validate|shards|subset|corpus|zeroshot`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{validate,shards,subset,corpus,zeroshot}")
    validate = sub.add_parser("validate", help="check a Kaldi data dir; every problem is printed as file:line")
    validate.add_argument("dir", help="data dir (wav.scp, text, utt2spk, ...)")
    validate.add_argument("--no-audio", action="store_true", help="do not open the audio files")

    shards = sub.add_parser("shards", help="write Parquet shards and OUT/data.list")
    shards.add_argument("dir", help="data dir")
    shards.add_argument("out", help="output folder")
    shards.add_argument("--utts-per-shard", type=int, default=1000)
    shards.add_argument("--num-workers", type=int, default=1)
    order = shards.add_mutually_exclusive_group()
    order.add_argument("--seed", type=int, default=0, help="seed of the utterances' order across shards")
    order.add_argument("--no-shuffle", action="store_true",
                       help="keep the data dir's order (by utterance id, so a shard holds few speakers)")

    subset = sub.add_parser("subset", help="a data dir with a random fraction of each speaker's utterances")
    subset.add_argument("dir", help="data dir")
    subset.add_argument("out", help="output data dir (its tables; the audio stays where it is)")
    subset.add_argument("--fraction", type=float, required=True, help="share of each speaker's utterances kept")
    subset.add_argument("--seed", type=int, default=0)

    corpus = sub.add_parser("corpus", help="build the synthetic multi-speaker English corpus")
    corpus.add_argument("--size", choices=["tiny", "default", "wide"], default="default",
                        help="tiny: 8 speakers for tests; default: 38 speakers, 10 h; wide: the test set and "
                             "hours of default with about twice its training voices")
    corpus.add_argument("--out", required=True, help="output folder (train/, dev/, test/, wavs/)")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--num-jobs", type=int, default=1, help="speakers rendered in parallel")

    zeroshot = sub.add_parser("zeroshot", help="zero-shot test list: each utterance prompted by another of its speaker")
    zeroshot.add_argument("dir", help="data dir (the test set)")
    zeroshot.add_argument("out", help="folder for manifest.tsv and utt2prompt (then the synthesised wavs)")


def run(args: argparse.Namespace) -> int:
    return {"validate": _validate, "shards": _shards, "subset": _subset, "corpus": _corpus,
            "zeroshot": _zeroshot}[args.action](args)


def _validate(args: argparse.Namespace) -> int:
    from cosy.data.kaldi import check

    report = check(args.dir, check_audio=not args.no_audio)
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"{args.dir}: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    hours = "" if args.no_audio else f", {report.seconds / 3600:.3f} hours"
    print(f"{args.dir}: OK, {report.num_utts} utterances, {report.num_speakers} speakers{hours}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from cosy.data.shards import write_shards

    result = write_shards(args.dir, args.out, args.utts_per_shard, args.num_workers,
                          None if args.no_shuffle else args.seed)
    print(f"wrote {result.rows} utterances in {len(result.shards)} shard(s) to {args.out}; "
          f"skipped {len(result.skipped)} with unreadable audio")
    return 0


def _subset(args: argparse.Namespace) -> int:
    from cosy.data.kaldi import DataDir

    full = DataDir.load(args.dir)
    part = full.sample(args.fraction, args.seed)
    part.save(args.out)
    print(f"wrote {len(part.utts)} of {len(full.utts)} utterances ({len(part.spk2utt)} speakers) to {args.out}")
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from cosy.data.synth_corpus import build_corpus

    report = build_corpus(args.out, args.size, args.seed, args.num_jobs)
    for item in report["dropped_utterances"]:
        print(f"dropped {item['utt']} ({item['engine']} {item['voice']} {item['variant']}): {item['reason']}",
              file=sys.stderr)
    for spk in report["dropped_speakers"]:
        print(f"dropped speaker {spk['id']} entirely ({spk['engine']} {spk['voice']} {spk['variant']})",
              file=sys.stderr)
    counts = ", ".join(f"{k} {v} utts / {report['speakers'][k]} spk" for k, v in report["utterances"].items())
    print(f"corpus in {args.out}: {counts}; {report['hours']} hours; built in {report['build_seconds']} s")
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from cosy.data.zeroshot import write_zeroshot

    lines = write_zeroshot(args.dir, args.out)
    print(f"wrote {lines} zero-shot lines to {args.out}/manifest.tsv and {args.out}/utt2prompt")
    return 0
