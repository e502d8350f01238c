"""Text sources for training: the offline Python standard-library corpus, text files and JSONL.

A *document* is one string. Every reader yields `(name, text)` pairs so that the pipeline can split
by document (held-out set) and report where each document came from.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

STDLIB_EXTENSIONS = (".py", ".txt", ".rst")


def stdlib_root() -> Path:
    """Folder of this interpreter's standard library (`sysconfig.get_paths()['stdlib']`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(root: str | os.PathLike | None = None,
                        extensions: tuple[str, ...] = STDLIB_EXTENSIONS) -> list[Path]:
    """Sorted list of the standard library's source and text files.

    Takes every `*.py`, `*.txt` and `*.rst` file under `root` (default: the running interpreter's
    stdlib), skipping `site-packages` and `__pycache__` (they differ between machines). The sort
    makes the list, and everything derived from it, deterministic.
    """
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"stdlib corpus: folder {base} does not exist")
    return _files_under(base, extensions, skip_dirs=("site-packages", "__pycache__", "dist-packages"))


def _files_under(base: Path, extensions: tuple[str, ...], skip_dirs: tuple[str, ...]) -> list[Path]:
    """Sorted files under `base` whose names end with one of `extensions`, folders named in `skip_dirs` skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        out.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(extensions))
    out.sort()
    return out


def read_text_file(path: str | os.PathLike) -> str | None:
    """UTF-8 text of `path`, or None for files that are not valid UTF-8 or contain NUL bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def iter_text_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None,
                    min_chars: int = 1) -> Iterator[tuple[str, str]]:
    """Yield `(name, text)` for every readable UTF-8 file of `paths` with at least `min_chars` characters.

    `name` is the path relative to `root` when given.
    """
    for p in paths:
        text = read_text_file(p)
        if text is None or len(text) < min_chars:
            continue
        name = os.path.relpath(p, root) if root is not None else str(p)
        yield name, text


def iter_stdlib_documents(root: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """The offline corpus: one document per standard-library `*.py` / `*.txt` / `*.rst` file."""
    base = Path(root) if root is not None else stdlib_root()
    yield from iter_text_files(stdlib_corpus_files(base), root=base, min_chars=16)


def site_packages_roots() -> list[Path]:
    """This interpreter's installed-package folders (`purelib`, `platlib`), existing and de-duplicated."""
    paths = sysconfig.get_paths()
    out: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def iter_python_packages_documents(roots: list[Path] | None = None) -> Iterator[tuple[str, str]]:
    """A larger offline corpus: every `*.py`, `*.txt`, `*.rst` and `*.md` file of the installed packages
    (torch, transformers, numpy, ... in this environment), sorted, `__pycache__` skipped. It differs between
    machines with different packages, unlike `stdlib`."""
    for base in roots if roots is not None else site_packages_roots():
        files = _files_under(Path(base), STDLIB_EXTENSIONS + (".md",), skip_dirs=("__pycache__",))
        yield from iter_text_files(files, root=base, min_chars=16)


def iter_jsonl_documents(path: str | os.PathLike, field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield `(name, text)` from a JSONL file whose lines are objects with a string `field`.

    Raises ValueError naming the file and line when a line is not JSON or lacks the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL source {path} does not exist")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field {field!r}")
            yield f"{path.name}:{lineno}", obj[field]


def iter_source_documents(source: str) -> Iterator[tuple[str, str]]:
    """Documents of one source spec.

    - `stdlib`: the Python standard-library corpus.
    - `python-packages`: the source and docs of the installed Python packages (site-packages).
    - a `.jsonl` file (optionally `file.jsonl:field`), one document per line.
    - a text file: one document.
    - a folder: every `*.txt`, `*.md`, `*.rst`, `*.py` file under it, one document each.
    """
    if source == "stdlib":
        yield from iter_stdlib_documents()
        return
    if source == "python-packages":
        yield from iter_python_packages_documents()
        return
    path, _, field = source.partition(".jsonl:")
    if field:
        yield from iter_jsonl_documents(path + ".jsonl", field=field)
        return
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or folder (use 'stdlib', 'python-packages', "
                                f"a file or a folder)")
    if p.is_dir():
        files = [q for q in sorted(p.rglob("*")) if q.is_file() and q.suffix in (".txt", ".md", ".rst", ".py")]
        yield from iter_text_files(files, root=p)
    elif p.suffix == ".jsonl":
        yield from iter_jsonl_documents(p)
    else:
        text = read_text_file(p)
        if text is None:
            raise ValueError(f"data source {source!r} is not UTF-8 text")
        yield p.name, text
