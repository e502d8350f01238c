"""The code passes the project's linter: `ruff check` with the configuration in pyproject.toml (pyflakes,
pycodestyle, import order; line length 120) over the library, the tests, the experiments and the scripts."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHS = ["sala", "tests", "experiments", "scripts"]


def _ruff_command() -> list[str] | None:
    """How to run ruff here: the installed `ruff` package through this interpreter (`python -m ruff`, the same
    environment as the tests), else a `ruff` executable on PATH; None when neither is installed."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    return [exe] if exe else None


def test_ruff_check_is_clean():
    cmd = _ruff_command()
    if cmd is None:
        pytest.skip("ruff is not installed (pip install 'sala-lm[dev]' or pip install ruff)")
    proc = subprocess.run([*cmd, "check", "--no-cache", "--output-format", "concise", *PATHS], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    rc, findings = proc.returncode, proc.stdout + proc.stderr
    assert rc == 0, f"`ruff check {' '.join(PATHS)}` found problems (exit {rc}):\n{findings}"
