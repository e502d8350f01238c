"""experiments/profiling/profile_train_step.py on the CPU: step time and top ops per run, and with --sites the
costliest ops grouped by the project code that called them (the tool that locates a step's copies and casts on the
GPU)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_profile_reports_call_sites(tmp_path, run_script, prepare_in):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(" ".join(f"word{j % 13} item {i}" for j in range(200)) + "\n")
    prepare_in(tmp_path, "packed", ["docs"], tokenizer="sala", val_fraction=0.1, seed=0)
    out = tmp_path / "prof.json"
    run_script(["profile_train_step.py", "--data", str(tmp_path / "packed"), "--preset", "sala-tiny",
                "--seq-len", "128", "--micro-batch", "2", "--steps", "1", "--only", "sala_sparse_off", "--sites", "8",
                "--fuse-projections", "--loss-chunk", "64",
                "--config", "hidden_size=96,num_attention_heads=6,num_key_value_heads=3,lightning_nh=6,lightning_nkv=6",
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
    # --config widened the preset (hidden 64 -> 96): the profiled model is that one
    from sala.train.config import ModelConfig
    from sala.train.model_factory import build_model

    tiny = sum(p.numel()
               for p in build_model(ModelConfig(kind="sala", preset="sala-tiny"), vocab_size=8192).parameters())
    wide = build_model(ModelConfig(kind="sala", preset="sala-tiny", config={
        "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "lightning_nh": 6, "lightning_nkv": 6}),
        vocab_size=8192)
    assert run["params"] == sum(p.numel() for p in wide.parameters()) > tiny


def test_profile_helpers_parse_overrides_and_measure_gpu_activity():
    """--config's key=value parsing, and the GPU's busy time as the union of overlapping kernel intervals."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "profiling"))
    from profile_train_step import device_kernels, gpu_activity, parse_overrides

    assert parse_overrides("hidden_size=640,rope_theta=1e4,flag=true,name=x") == {
        "hidden_size": 640, "rope_theta": 1e4, "flag": True, "name": "x"}
    assert parse_overrides("") == {}
    with pytest.raises(SystemExit, match="not key=value"):
        parse_overrides("hidden_size")

    def ev(a: float, b: float, kind: str = "CUDA", name: str = "k"):
        return SimpleNamespace(time_range=SimpleNamespace(start=a, end=b), device_type=SimpleNamespace(name=kind),
                               name=name)

    # kernels at 0-1000 and 500-2000 us overlap (2 ms busy), then 3000-4000 us; a host event does not count
    prof = SimpleNamespace(events=lambda: [ev(3000, 4000), ev(0, 1000), ev(500, 2000), ev(0, 9000, "CPU")])
    assert gpu_activity(prof) == {"gpu_kernels_ms": 3.0, "gpu_span_ms": 4.0, "gpu_events": 3}
    assert gpu_activity(SimpleNamespace(events=lambda: [])) == {}

    # kernels by name, costliest first; host ops are not counted
    prof = SimpleNamespace(events=lambda: [ev(0, 1000, name="gemm"), ev(1000, 1500, name="norm"),
                                           ev(2000, 3000, name="gemm"), ev(0, 9000, "CPU", name="aten::mm")])
    assert device_kernels(prof, 5) == [{"name": "gemm", "calls": 2, "ms": 2.0}, {"name": "norm", "calls": 1, "ms": 0.5}]
    assert device_kernels(prof, 1) == [{"name": "gemm", "calls": 2, "ms": 2.0}]
