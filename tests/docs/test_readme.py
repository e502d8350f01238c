"""The README's runnable Python examples run (blocks preceded by `<!-- runnable -->`), its set-up and test commands
are where CI looks for them, and docs/results.md is generated from the committed JSON."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCKS = re.findall(r"<!-- runnable -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, capsys):
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()


def test_results_tables_are_generated_from_the_committed_json(load_script):
    tables = load_script("make_results_tables")            # `python scripts/make_results_tables.py --check`
    assert tables.main(["--check"]) == 0, "docs/results.md is out of date: run python scripts/make_results_tables.py"


def test_readme_starts_with_the_two_setup_commands_and_links_the_results():
    """The first screen tells a new user what to run: the demo command, then the test command CI runs (.ci/run reads
    the second line after the marker), before any other code block; the headline table links docs/results.md."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "sala demo" in blocks[0] and "pytest" in blocks[1]
    lines = text.splitlines()
    marker = lines.index("<!-- test-command -->")
    assert "pytest" in lines[marker + 2] and text.index("sala demo") < text.index("<!-- test-command -->") < 2000
    assert "docs/results.md" in text and (ROOT / "docs" / "results.md").is_file()


def test_readme_shows_a_runs_calibration_variants(load_script):
    """A training summary with calibration variants gets a table: every variant, its speed against the base, the
    one that trained, and why one was not measured."""
    tables = load_script("make_results_tables")
    rows = [{"name": "base", "overrides": [], "tokens_per_s": 800_000.0, "mfu": 0.30},
            {"name": "blocks", "overrides": ["model.compile_blocks=true"], "tokens_per_s": 840_000.0, "mfu": 0.315},
            {"name": "dkdv", "overrides": ["env.TORCHINDUCTOR_MAX_AUTOTUNE=1"], "rejected": "differs by 0.3"}]
    lines = tables._calibration_variant_lines(
        {"calibration": {"variants": {"variants": rows, "chosen": "blocks", "min_gain": 0.01, "forced": False}}})
    assert "| blocks | `model.compile_blocks=true` | 840,000 | 1.050x | 31.5% | trained |" in lines
    assert "| dkdv | `env.TORCHINDUCTOR_MAX_AUTOTUNE=1` | - | - | - | differs by 0.3 |" in lines
    assert tables._calibration_variant_lines({"calibration": {"variant": "base", "variants": None}}) == []


def test_readme_shows_greedy_and_teacher_forced_niah(load_script):
    """A training summary whose niah_single was also scored teacher-forced (and in fp32) gets both tables."""
    tables = load_script("make_results_tables")
    tf = {"n": 50, "skipped": 0, "exact": 86.0, "first_token": 98.0, "token_accuracy": 95.5, "greedy_exact": 70.0,
          "disagree": list(range(8))}
    cell = {"score": 70.0, "n": 50, "teacher_forced": tf}
    d = {"niah": {"lengths": [4096, 16384], "results": {"niah_single": {"4096": cell, "16384": {"score": 60.0}}},
                  "fp32_diagnostic": {"results": {"niah_single": {"16384": {**cell, "teacher_forced": tf}}}},
                  "hype_diagnostic": {"base": 500.0, "results": {"niah_single": {"4096": cell, "16384": cell}}}}}
    lines = tables._teacher_forced_lines(d)
    assert lines.count("| teacher-forced, exact | 86.0 |") == 2 and "| greedy decoding, exact | 70.0 |" in lines
    assert "| teacher-forced, exact | 86.0 | 86.0 |" in lines and any("a = 500" in x for x in lines)
    assert "| samples where the two differ | 8 |" in lines
    assert any("fp32" in x for x in lines) and any(x.startswith("| niah_single | 16K |") for x in lines)
    assert tables._teacher_forced_lines({"niah": {"lengths": [4096], "results": {"niah_single": {"4096": {}}}}}) == []
