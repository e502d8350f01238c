"""Data preparation sits below evaluation: importing `sala.data` (prepare and the synthetic tasks included) loads
no `sala.eval` module, and evaluation's task names are the data package's."""
from __future__ import annotations

import subprocess
import sys


def test_sala_data_does_not_import_sala_eval():
    code = ("import sys, sala.data.prepare, sala.data.synthetic; "
            "print(sorted(m for m in sys.modules if m.startswith('sala.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_eval_tasks_are_the_data_packages():
    from sala.data import synthetic
    from sala.eval import tasks

    assert tasks.generate is synthetic.generate and tasks.TASKS is synthetic.TASKS
