"""Errors meant for the user: the CLI prints their message on one line, without a traceback.

`SalaError` subclasses `ValueError`, so library callers that catch ValueError keep working. Raise the most
specific class: the CLI maps `UsageError` (bad input: a file, a field, a value) to exit status 2 and the others
to 1. Messages name the file, field or value, the limit, and what to do.
"""
from __future__ import annotations

import errno
import os


class SalaError(ValueError):
    """A failure explained in its message (exit status 1)."""

    exit_code = 1


class UsageError(SalaError):
    """Bad input from the user: an argument, a config field, a file's content (exit status 2)."""

    exit_code = 2


class ResumeMismatchError(UsageError):
    """An output folder holds work made with other options than this run's."""


class DiskFullError(SalaError):
    """A write failed because the disk (or quota) is full."""


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left" / "quota exceeded" errors, and torch.save's "unexpected pos" (a short write)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "unexpected pos" in text or "file write failed" in text


def disk_full_error(path: str | os.PathLike, exc: BaseException) -> DiskFullError:
    """A DiskFullError naming `path` (and its free space when it can be read)."""
    where = os.fspath(path)
    free = ""
    try:
        probe = where
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        st = os.statvfs(probe or ".")
        free = f" ({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free there now)"
    except OSError:
        pass
    return DiskFullError(f"the disk is full: writing {where} failed{free}; free some space or choose another "
                         f"output folder, then run again")


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """Raise UsageError unless `path` (a folder, created if missing) can be written, before any work starts."""
    import tempfile

    p = os.fspath(path)
    try:
        os.makedirs(p, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"{what} {p} is not writable ({reason}): choose a folder you can write to") from None


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> None:
    """Raise UsageError unless file `path` can be created or replaced (its folder writable; not a folder)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise UsageError(f"{what} {p} is a directory: give a file name")
    parent = os.path.dirname(os.path.abspath(p))
    check_writable_dir(parent, f"the folder of {what} {p},")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise UsageError(f"{what} {p} exists and is not writable: choose another file")
