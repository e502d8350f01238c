"""`sala train` as a user meets it: signals save a checkpoint, resume checks what it resumes, broken checkpoints
fall back, bad configs and unwritable folders are one-line errors (the tiny CPU config).

The runs go through `sala.cli.main` (the console script's entry point) in this process; one real process is
stopped by SIGTERM from outside, as a scheduler stops it (the exit status the shell sees included)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sala.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "train" / "sala_tiny_cpu.yaml")


@pytest.fixture
def sala(capsys):
    """sala(*args) -> (exit status, stdout, stderr) of `sala ARGS` run by `sala.cli.main` in this process."""
    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from sala.data import prepare

    root = tmp_path_factory.mktemp("interrupt")
    docs = root / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        (docs / f"d{i}.txt").write_text(" ".join(["alpha beta gamma delta"] * int(rng.integers(10, 40))) + "\n")
    prepare(str(root / "packed"), [str(docs)], val_fraction=0.1, log=lambda s: None)
    return root / "packed"


def _args(packed, out, *extra):
    return ["train", TINY, f"data.path={packed}", f"out_dir={out}", "progress=false", "log_every=1",
            "stages.0.seq_len=64", "stages.1.seq_len=64", "stages.0.micro_batch=1", "stages.1.micro_batch=1",
            "eval_windows=1", "stages.0.warmup_steps=0", *extra]


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody may create files in: a chmod 0555 folder, or (as root, who ignores modes) one under /sys."""
    if os.geteuid() == 0:
        return Path("/sys/sala-test-readonly")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "sub"


def _check_stopped_and_resume(sala, packed, out, sig, returncode, stdout, stderr):
    """The run stopped by `sig` exited 128 + sig after saving a checkpoint at its last step; the same command
    resumes there."""
    assert returncode == 128 + sig, (stdout, stderr)
    assert "Traceback" not in stderr
    assert f"received {signal.Signals(sig).name}" in stdout and "stopped at step" in stdout, stdout
    step = json.loads(stdout.strip().splitlines()[-1])["global_step"]
    assert 1 <= step < 400
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "model.pt").is_file() and (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    rc, again, err = sala(*_args(packed, out, "stages.0.steps=400", f"stop_after={step + 2}"))
    assert rc == 0, err
    assert f"resumed from {ckpt} at step {step}" in again
    assert json.loads(again.strip().splitlines()[-1])["global_step"] == step + 2


def test_sigterm_to_the_process_saves_a_checkpoint_and_the_run_resumes(packed, tmp_path, sala):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # long enough that it cannot finish before the signal: 400 steps, stopped after the first logged step
    proc = subprocess.Popen([sys.executable, "-m", "sala.cli", *_args(packed, out, "stages.0.steps=400")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    try:
        for _ in range(4800):               # a bound on the polls (4 min), not a latency budget
            if metrics.is_file() and any('"loss"' in ln for ln in metrics.read_text().splitlines()):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("no training step was logged")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_stopped_and_resume(sala, packed, out, signal.SIGTERM, proc.returncode, stdout, stderr)


def test_sigint_saves_a_checkpoint_and_the_run_resumes(packed, tmp_path, sala, monkeypatch):
    """Ctrl-C: SIGINT comes to this process once the first step is logged (the trainer's handler replaces
    Python's KeyboardInterrupt for the length of fit())."""
    from sala.train.metrics import MetricsLog

    out = tmp_path / "run"
    write, sent = MetricsLog.write, []

    def write_then_interrupt(self, record):
        write(self, record)
        if "loss" in record and not sent:
            sent.append(record["step"])
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "write", write_then_interrupt)
    try:
        rc, stdout, stderr = sala(*_args(packed, out, "stages.0.steps=400"))
    except KeyboardInterrupt:               # the trainer's handler was not in place
        pytest.fail("SIGINT during training raised KeyboardInterrupt instead of stopping after the step")
    monkeypatch.undo()
    assert sent
    _check_stopped_and_resume(sala, packed, out, signal.SIGINT, rc, stdout, stderr)


def test_resume_with_other_options_refuses_and_overwrite_starts_again(packed, tmp_path, sala):
    out = tmp_path / "run"
    rc, _, err = sala(*_args(packed, out, "stages.0.steps=2", "stages.1.steps=1", "save_final=false"))
    assert rc == 0, err
    other = packed.parent / "packed-copy"
    if not other.exists():
        import shutil

        shutil.copytree(packed, other)
    rc, stdout, err = sala(*_args(packed, out, "stages.0.steps=2", "stages.1.steps=1", f"data.path={other}",
                                  "optim.lr=1e-3"))
    assert rc == 2, (stdout, err)
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "data.path" in err and "optim.lr" in err and "--overwrite" in err, err
    assert (out / "checkpoints" / "step_00000003").is_dir()       # nothing deleted by the refusal
    # more steps of the same run resume: steps may change
    rc, stdout, err = sala(*_args(packed, out, "stages.0.steps=3", "stages.1.steps=1", "save_final=false"))
    assert rc == 0 and "resumed from" in stdout, err
    rc, stdout, err = sala(*_args(packed, out, "stages.0.steps=1", "stages.1.steps=1", "optim.lr=1e-3",
                                  "save_final=false"), "--overwrite")
    assert rc == 0, err
    assert "resumed" not in stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000001", "step_00000002"]


def test_truncated_latest_checkpoint_falls_back_with_a_warning(packed, tmp_path, sala):
    out = tmp_path / "run"
    rc, _, err = sala(*_args(packed, out, "stages.0.steps=2", "stages.1.steps=1", "save_every=1",
                             "save_final=false"))
    assert rc == 0, err
    newest = out / "checkpoints" / "step_00000003"
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])
    rc, stdout, err = sala(*_args(packed, out, "stages.0.steps=2", "stages.1.steps=2", "save_final=false"))
    assert rc == 0, err
    assert "model.pt is truncated or corrupt" in stdout and "resuming from the previous one" in stdout, stdout
    assert "resumed from" in stdout and "step_00000002 at step 2" in stdout
    # every checkpoint broken: one line naming the files
    for ck in (out / "checkpoints").glob("step_*"):
        (ck / "optim.pt").write_bytes(b"garbage")
    rc, _, err = sala(*_args(packed, out, "save_final=false"))
    assert rc == 1 and "Traceback" not in err
    assert "no usable checkpoint" in err and "optim.pt" in err, err


def test_bad_config_files_and_unwritable_out_dir_are_one_line_errors(packed, tmp_path, capsys):
    """(The subprocess case of a malformed YAML with --debug is in tests/cli/test_cli_errors.py.)"""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kind: sala\nstages: [\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "invalid YAML at line" in err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"stages": [}')
    assert main(["train", str(bad_json)]) == 2
    assert "invalid JSON at line 1, column 13" in capsys.readouterr().err
    assert main(["train", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(_args(packed, _unwritable(tmp_path))) == 2
    err = capsys.readouterr().err.strip()
    assert "is not writable" in err and "out_dir" in err and len(err.splitlines()) == 1
