"""The `skipgpt` command line. Each subcommand lives in its own module, which provides
`add_parser(subparsers)` (registering its flags, with help) and sets `func` on its parser."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `skipgpt --help` lists them.
COMMANDS: list[str] = ["convert", "eval", "bench", "setup", "train_router", "prune_static"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipgpt",
        description="Fast inference, evaluation and benchmarks for SkipGPT token-routed models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"skipgpt.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
