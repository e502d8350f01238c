"""`sala eval niah` on interruption writes what it finished (marked partial); its CPU defaults say what they are;
long waits show progress (generate's prefill, eval's samples, the demo's prefill); the README's transformers
example runs as written."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sala.cli import main
from sala.utils.bundled import BUNDLED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


NIAH_ARGS = ["eval", "niah", "--lengths", "512,4k", "--num-samples", "6", "--device", "cpu", "--no-progress"]


def _check_partial_report(out: Path, returncode: int, stdout: str, stderr: str) -> None:
    """Stopped during the second length (many samples): the finished cell is written, marked partial."""
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "partial" in stderr
    report = json.loads(out.read_text())
    assert report["partial"] is True
    assert list(report["results"]["niah_single"]) == ["512"] and report["results"]["niah_single"]["512"]["n"] == 6
    assert report["interrupted_at"]["length"] == 4096 and report["interrupted_at"]["samples_done"] < 6
    assert report["lengths"] == [512] and report["finished"] == [{"task": "niah_single", "length": 512}]
    assert "| niah_single |" in stdout


def test_sigterm_to_the_process_writes_the_finished_part(tmp_path):
    """A real process stopped by SIGTERM from outside (the handler `sala eval` installs turns it into Ctrl-C's
    KeyboardInterrupt); the exit status the shell sees is 130."""
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # the second length has many samples: the signal arrives while it runs
    proc = subprocess.Popen([sys.executable, "-m", "sala.cli", *NIAH_ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:            # the first finished cell is printed as "niah_single   512 tokens: ..."
            lines.append(line)
            if re.match(r"niah_single\s+512 tokens:", line):
                break
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_partial_report(out, proc.returncode, rest, err)


def test_sigint_writes_the_finished_part(tmp_path, capsys, monkeypatch):
    """Ctrl-C (Python's own SIGINT handler raises KeyboardInterrupt): SIGINT comes to this process as the first
    sample of the second length starts."""
    from sala.eval import runner

    out = tmp_path / "report.json"
    predict, calls = runner.predict, []

    def predict_then_interrupt(model, tok, sample, dev):
        calls.append(sample)
        if len(calls) == 7:                 # 6 samples of 512 tokens done: the first of 4k
            os.kill(os.getpid(), signal.SIGINT)
        return predict(model, tok, sample, dev)

    monkeypatch.setattr(runner, "predict", predict_then_interrupt)
    try:
        rc = main([*NIAH_ARGS, "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("SIGINT during the evaluation escaped `sala eval` as KeyboardInterrupt")
    assert len(calls) == 7
    captured = capsys.readouterr()
    _check_partial_report(out, rc, captured.out, captured.err)


def test_cpu_defaults_are_printed_and_used(tmp_path, capsys):
    out = tmp_path / "r.json"                     # --device cpu: the CPU's defaults, on any machine
    assert main(["eval", "niah", "--lengths", "512", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "on the CPU the defaults are --num-samples 5" in err and "--lengths 1k,4k,16k,64k" in err
    report = json.loads(out.read_text())
    assert report["num_samples"] == 5 and "partial" not in report


def test_progress_bars_report_tokens_and_samples(tmp_path, capsys, monkeypatch):
    from sala.utils import progress

    monkeypatch.setattr(progress, "DEFAULT_DELAY_S", 0.0)     # show every bar at once (no wait needed)
    prompt = tmp_path / "p.txt"
    prompt.write_text("word " * 600)
    assert main(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "2", "--device", "cpu",
                 "--chunk-size", "128"]) == 0
    err = capsys.readouterr().err
    assert "prefill" in err and re.search(r"\d+/\d+ \[", err) and "tok/s" in err, err
    n = int(re.findall(r"(\d+)/(\d+) \[", err)[-1][1])
    assert n > 600
    assert main(["eval", "niah", "--lengths", "512", "--num-samples", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "niah_single 512 tokens" in err and "2/2" in err, err
    assert main(["demo", "--length", "512", "--no-dense"]) == 0
    assert "prefill" in capsys.readouterr().err


def test_readme_transformers_example_runs_as_written(capsys):
    """The README's plain-transformers block, with the bundled model's path and the CPU for "cuda", run like the
    README's runnable blocks (tests/docs/test_readme.py): in this process, with fresh globals. The block starts
    with `import sala` (the pattern below requires it), which registers the model with transformers; a fresh
    interpreter, without and then with sala imported, is tests/cli/test_cli_errors.py's
    test_auto_model_without_import_sala_says_what_to_do."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import sala, torch\nfrom transformers import AutoModelForCausalLM.*?)```", text,
                      re.S)
    assert block, "the README's transformers example is missing"
    code = block.group(1).replace("path/to/MiniCPM-SALA", str(BUNDLED_MODEL_DIR)).replace('"cuda"', '"cpu"')
    capsys.readouterr()
    exec(compile(code, str(ROOT / "README.md"), "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.startswith("<|bos|>The capital of France is")
