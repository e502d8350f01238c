"""Token counts written the way people write them: 4k, 64K, 1M, 2m, 131072."""
from __future__ import annotations

_UNITS = {"k": 1024, "m": 1024 * 1024}


def parse_length(text: str) -> int:
    """'64k' -> 65536, '1M' -> 1048576, '1000' -> 1000. Raises ValueError on anything else."""
    s = text.strip().lower()
    mult = 1
    if s and s[-1] in _UNITS:
        mult, s = _UNITS[s[-1]], s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"not a token count: {text!r} is not a number like 4096, 4k or 1M") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"not a positive whole token count: {text!r}")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """'4k,64k,1M' -> [4096, 65536, 1048576]."""
    return [parse_length(part) for part in text.split(",") if part.strip()]


def format_length(n: int) -> str:
    """1048576 -> '1M', 65536 -> '64K', 1000 -> '1000'."""
    for unit, size in (("M", 1024 * 1024), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _argparse_type(parse):
    """An argparse `type=` from a parser: its ValueError message reaches the user verbatim."""
    import argparse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


length_arg = _argparse_type(parse_length)     # one length: 4096, 64k, 1M
lengths_arg = _argparse_type(parse_lengths)   # a comma-separated list of them
