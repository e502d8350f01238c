"""The `sala` command line.

Each subcommand lives in its own module under `sala/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func=callable(args) -> int | None`.
Modules are discovered automatically, so adding a command is adding a file.

Errors reach the user as one line `sala COMMAND: error: ...` (exit status 2 for bad input: arguments, files,
config fields; 1 for other failures; 130 when interrupted). `sala --debug COMMAND ...` (or SALA_DEBUG=1) shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

import sala.commands as _commands
from sala.utils.errors import SalaError, disk_full_error, is_disk_full


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sala",
        description="MiniCPM-SALA: sparse + linear attention hybrid LLMs for million-token contexts",
    )
    parser.add_argument("--debug", dest="global_debug", action="store_true",
                        help="show the full traceback of an error (for developers)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"sala.commands.{info.name}")
        module.register(sub)
    return parser


def _os_error_message(e: OSError) -> str:
    """One line for an OSError: our own messages as they are, the system's with the file named."""
    if e.filename is None or e.strerror is None:
        return str(e)
    names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    hint = {PermissionError: "check the permissions, or choose another path",
            IsADirectoryError: "give a file, not a directory",
            NotADirectoryError: "a part of this path is a file, not a directory",
            FileNotFoundError: "check the path"}.get(type(e), "")
    return f"{names}: {e.strerror}" + (f" ({hint})" if hint else "")


def describe_error(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that reaches the CLI."""
    try:
        import yaml

        yaml_error: type = yaml.YAMLError
    except ImportError:  # pragma: no cover - pyyaml is a dependency of the train extra
        yaml_error = ()
    if is_disk_full(e):
        path = getattr(e, "filename", None) or getattr(e, "sala_path", None) or "a file"
        return str(disk_full_error(path, e)), 1
    if isinstance(e, SalaError):
        return str(e), e.exit_code
    if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return _os_error_message(e), 2
    if isinstance(e, OSError):
        return _os_error_message(e), 1
    if yaml_error and isinstance(e, yaml_error):
        return f"invalid YAML: {' '.join(str(e).split())}", 2
    if isinstance(e, ValueError):
        return str(e), 2
    if isinstance(e, (RuntimeError, MemoryError)):
        return str(e), 1
    return (f"internal error: {type(e).__name__}: {e} (run `sala --debug ...` for the traceback, and please "
            f"report it)"), 1


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of each message (it may be replaced)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_library_logs() -> None:
    """Messages that sala's library modules log at INFO and above go to stderr, one plain line each."""
    log = logging.getLogger("sala")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _show_library_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.global_debug or getattr(args, "debug", False) or os.environ.get("SALA_DEBUG", "") not in ("", "0")
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"sala {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        message, code = describe_error(e)
        message = message.strip() or type(e).__name__
        print(f"sala {args.command}: error: {message}", file=sys.stderr)
        return code
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
