"""scripts/train_small_gpu.sh (the GPU training run) works end to end: its SMALL_CPU dry run, on the CPU, with the
retrieval warm-up stage and the retrieval-rich decay stage switched on, so a broken script cannot waste a GPU call."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sala.data import prepare

ROOT = Path(__file__).resolve().parent.parent


def test_train_small_gpu_dry_run_with_all_stages(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"d{i}.txt").write_text(" ".join(f"word{j % 17} item {i}" for j in range(120)) + "\n")
    data = tmp_path / "packed"
    prepare(str(data), [str(docs)], tokenizer="sala", val_fraction=0.2, seed=0, log=lambda s: None)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "SMALL_CPU": "1", "DATA": str(data), "WORK_DIR": str(work), "PYTHONPATH": str(ROOT),
           "DECAY_SYNTHETIC_FRACTION": "0.6", "RETRIEVAL_WARMUP_SHARE": "0.3",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "train_small_gpu.sh"), str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["config"]["stages"]
    assert [s["name"] for s in stages] == ["retrieval", "stable", "decay"]
    assert stages[0]["data"] == str(data) + "_short" and stages[2]["data"] == str(data) + "_decay"
    assert stages[2]["sparse"] is True
    assert summary["training"]["steps"] == sum(s["steps"] for s in stages)
    assert summary["retrieval_warmup"]["share"] == 0.3
    assert summary["training"]["decay_sparse_on"]["median_tokens_per_s"] > 0
    assert summary["niah"]["status"] == "done" and summary["niah"]["results"]["niah_single"]
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
