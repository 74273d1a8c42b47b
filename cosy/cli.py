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


register("data", "cosy.data.cli", "data directories: validate, shards, synthetic corpus")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosy",
        description="cosy: zero-shot text-to-speech research framework",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<12} {h}" for n, (_, h) in sorted(COMMANDS.items())),
    )
    parser.add_argument("--version", action="version", version=f"cosy {__version__}")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="command",
                        help="one of: " + ", ".join(sorted(COMMANDS)))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv[:1])
        if args.command is None:
            parser.print_help()
            return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"cosy {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        code = module.run(args)
    except CosyError as err:
        print(f"cosy {name}: error: {err}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
