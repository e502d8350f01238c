"""experiments/repro_halo/repro_halo.py (the HALO reproduction's GPU call) works end to end at toy size on the CPU
(--tiny): prepare, then the one-call `gpu` pipeline (teacher, three conversions, the bundle, the evaluation), then
the plot and table, so a broken script cannot waste a GPU call. The teachers train a fixed number of steps and the
time budget is far beyond what the toy run needs, so nothing depends on the machine's speed. The continual step
(--continue-fraction > 0) is `sala.train.continual.continue_training`, tested in test_continual.py."""
from __future__ import annotations

import json

import pytest

TINY = ["--tiny", "--continue-fraction", "0"]


@pytest.mark.slow
def test_repro_pipeline_at_toy_size(tmp_path, run_script):
    data, work, out = tmp_path / "data", tmp_path / "work", tmp_path / "out"
    run_script(["repro_halo.py", "prepare", *TINY, "--data", str(data), "--max-docs", "40"], tmp_path)
    run_script(["repro_halo.py", "gpu", *TINY, "--data", str(data), "--work", str(work), "--out", str(out),
                "--teacher-steps", "6", "--bundle-steps", "3", "--total-seconds", "100000"], tmp_path)
    res = json.loads((out / "repro_results.json").read_text())
    failed = {k: v.get("error", "")[-300:] for k, v in res["steps"].items() if not v["ok"]}
    assert not failed, failed
    for variant in ("teacher", "sala", "all_lightning", "sala_rope"):
        assert any(k == f"eval_{variant}" for k in res["steps"]), sorted(res["steps"])
    assert res["teacher_train"]["steps"] == 6 and res["bundle_teacher_train"]["steps"] == 3
    assert res["config"]["fractions"]["continue"] == 0.0
    assert (work / "sala_converted" / "model.safetensors").is_file()   # the converted model, kept
    assert (work / "sala" / "model.safetensors").is_file()             # the final one (no continual budget: a copy)
    assert all(res["convert"][v]["fraction_of_teacher_tokens"] <= 0.25 for v in ("sala", "all_lightning", "sala_rope"))
    png, table = tmp_path / "repro.png", tmp_path / "repro.md"
    run_script(["repro_halo.py", "plot", *TINY, "--results", str(out / "repro_results.json"), "--png", str(png),
                "--table", str(table)], tmp_path)
    assert png.stat().st_size > 0 and "| SALA" in table.read_text()
