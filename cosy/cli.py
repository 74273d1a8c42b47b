"""The `cosy` command.

Each subcommand lives in the module that owns its idea; this file only maps names to
modules so that `cosy --help` stays fast (no torch import until a command runs).
A command module exposes `add_arguments(parser)` and `run(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cosy import __version__
from cosy.errors import CosyError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {}


def register(name: str, module: str, help: str) -> None:
    COMMANDS[name] = (module, help)


# Two-word names ("extract tokens") let each package own its part of a verb.
register("data", "cosy.data.cli", "data directories: validate, write shards, build the synthetic corpus")
register("train", "cosy.train.cli", "train any cosy model from a YAML config (works under torchrun)")
register("average", "cosy.train.average", "average the best N checkpoints of an experiment")
register("extract tokens", "cosy.tokenizer.extract", "write speech tokens of a data dir with an S3 tokenizer")
register("extract embeddings", "cosy.speaker.extract", "write speaker embeddings of a data dir")
register("export tokenizer", "cosy.tokenizer.onnx", "export an S3 tokenizer checkpoint to ONNX")
register("export speaker", "cosy.speaker.onnx", "export a speaker encoder checkpoint to ONNX")
register("export flow", "cosy.flow.onnx", "export the flow-matching estimator to ONNX")
register("export vocoder", "cosy.vocoder.export", "export a vocoder generator to ONNX")
register("eval tokenizer", "cosy.tokenizer.evaluate", "WER, codebook usage and speaker leakage of a tokenizer")
register("eval speaker", "cosy.speaker.evaluate", "equal error rate of a speaker encoder on trial pairs")
register("eval vocoder", "cosy.vocoder.evaluate", "copy-synthesis scores of a vocoder")
register("eval tts", "cosy.eval.tts", "score synthesised speech: independent ASR WER, speaker similarity, DNSMOS")
register("synthesize", "cosy.inference.cli", "speak text in the voice of a prompt recording")
register("vc", "cosy.inference.vc", "voice conversion: a source recording's words in a prompt's voice")
register("convert", "cosy.inference.vc", "voice conversion with --source-wav/--prompt-wav (same as vc)")
register("convert cosyvoice", "cosy.convert.cosyvoice", "released CosyVoice-300M files -> a cosy model dir")
register("pack", "cosy.inference.model_dir", "assemble a model directory from trained parts")
register("serve", "cosy.inference.server", "an HTTP server for synthesis: POST /synthesize, GET /health")
register("bench", "cosy.bench", "speed of synthesis: RTF, streaming latency, LM tokens/s, memory")
register("text bpe", "cosy.text.cli", "train a byte-level BPE text tokenizer on the transcripts of data dirs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosy",
        description="cosy: zero-shot text-to-speech research framework",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<20} {h}" for n, (_, h) in sorted(COMMANDS.items())),
    )
    parser.add_argument("--version", action="version", version=f"cosy {__version__}")
    parser.add_argument("command", nargs="?", choices=sorted({n.split()[0] for n in COMMANDS}),
                        metavar="command", help="see the list below")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if name not in COMMANDS:
        verbs = sorted({n.split()[0] for n in COMMANDS})
        if argv and argv[0] in verbs:
            print(f"cosy {argv[0]}: choose one of: "
                  + ", ".join(n for n in sorted(COMMANDS) if n.split()[0] == argv[0]), file=sys.stderr)
            return 2
        args = build_parser().parse_args(argv[:1])
        if args.command is None:
            build_parser().print_help()
            return 2
    nwords = len(name.split())
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"cosy {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[nwords:])
    try:
        code = module.run(args)
    except CosyError as err:
        print(f"cosy {name}: error: {err}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
