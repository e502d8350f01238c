"""Subcommands of the `sala` CLI: one module per command, each with `register(subparsers)`."""
