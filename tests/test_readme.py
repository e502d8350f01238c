"""The README's runnable Python examples run (blocks preceded by `<!-- runnable -->`)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"<!-- runnable -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, capsys):
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()


def test_readme_tables_are_generated_from_the_committed_json():
    import subprocess
    import sys
    script = README.parent / "scripts" / "make_readme_tables.py"
    rc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True).returncode
    assert rc == 0, "README.md is out of date: run python scripts/make_readme_tables.py"
