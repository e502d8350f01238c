"""The `sala` command line.

Each subcommand lives in its own module under `sala/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func=callable(args) -> int | None`.
Modules are discovered automatically, so adding a command is adding a file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import sala.commands as _commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sala",
        description="MiniCPM-SALA: sparse + linear attention hybrid LLMs for million-token contexts",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"sala.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError) as e:
        # Errors raised by sala carry a message meant for the user: print it, no traceback.
        if getattr(args, "debug", False):
            raise
        print(f"sala {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
