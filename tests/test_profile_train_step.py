"""scripts/profile_train_step.py on the CPU: step time and top ops per run, and with --sites the costliest ops grouped
by the project code that called them (the tool that locates a step's copies and casts on the GPU)."""
from __future__ import annotations

import json


def test_profile_reports_call_sites(tmp_path, run_script, prepare_in):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(" ".join(f"word{j % 13} item {i}" for j in range(200)) + "\n")
    prepare_in(tmp_path, "packed", ["docs"], tokenizer="sala", val_fraction=0.1, seed=0)
    out = tmp_path / "prof.json"
    run_script(["profile_train_step.py", "--data", str(tmp_path / "packed"), "--preset", "sala-tiny", "--seq-len", "128",
                "--micro-batch", "2", "--steps", "1", "--only", "sala_sparse_off", "--sites", "8", "--fuse-projections", "--loss-chunk", "64",
                "--out", str(out)],
               tmp_path)
    run = json.loads(out.read_text())["runs"]["sala_sparse_off"]
    assert run["step_ms"] > 0 and run["top"]
    sites = run["sites"]
    assert 0 < len(sites) <= 8 and all(s["op"].startswith("aten::") and s["calls"] >= 1 for s in sites)
    assert [s["self_ms"] for s in sites] == sorted((s["self_ms"] for s in sites), reverse=True)
    # the model's own frames name where the time is spent (file and line inside sala/)
    assert any(f.startswith("sala/") or "/sala/" in f for s in sites for f in s["stack"]), sites
    args = json.loads(out.read_text())["args"]
    assert args["fuse_projections"] is True and args["loss_chunk"] == 64
