"""experiments/profiling/host_ops.py on the CPU: a prefill chunk's operator calls and Triton launches, plain and
what the piecewise graphs leave to the host (the sparse layers' attention)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_host_ops_counts_the_eager_part_of_a_piecewise_chunk(tmp_path):
    out = tmp_path / "host_ops.json"
    # its own process: the script puts the kernels in the interpreter and counts (skips) their launches
    subprocess.run([sys.executable, str(ROOT / "experiments/profiling/host_ops.py"), "--preset", "sala-tiny",
                    "--context", "160", "--chunk", "32", "--hidden", "128", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=600)
    d = json.loads(out.read_text())
    c = d["counts"]
    assert d["sparse_layers"] == 2 and d["layers"] == 4
    plain, eager, whole = c["plain"], c["piecewise_eager_part"], c["piecewise_all"]
    assert plain["triton_launches"] > 0 and whole["triton_launches"] == plain["triton_launches"]
    # the dense pieces are most of a chunk's host work; only the sparse layers' attention stays eager
    assert 0 < eager["aten_calls"] < plain["aten_calls"] / 2
    assert 0 < eager["triton_launches"] < plain["triton_launches"] / 2
    assert set(eager["launches_by_kernel"]) <= set(plain["launches_by_kernel"])
    assert not any("lightning" in k or "rms_norm" in k for k in eager["launches_by_kernel"])
