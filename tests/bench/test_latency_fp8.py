"""sala.bench.latency --quantization fp8 on the CPU: the FP8 targets, the refusal before anything is built."""
from __future__ import annotations

import pytest
import torch

import sala.ops.fp8 as fp8_ops
from sala.bench import latency

K256, K1M, K2M = "262144", "1048576", "2097152"


def _payload(quantization: str | None, sala_256k: float, base_256k: float, sala_1m: float, peak_1m: float,
             tps_1m: float = 120.0) -> dict:
    p = {"sala": {K256: {"status": "ok", "ttft_s": sala_256k},
                  K1M: {"status": "ok", "ttft_s": sala_1m, "peak_gib": peak_1m, "decode_tokens_per_s": tps_1m},
                  K2M: {"status": "OOM"}},
         "baseline": {K256: {"status": "ok", "ttft_s": base_256k}, K1M: {"status": "not run"}}}
    if quantization is not None:
        p["setup"] = {"quantization": quantization}
    return p


def test_fp8_targets_use_the_fp8_thresholds():
    t = latency._targets(_payload("fp8", sala_256k=2.0, base_256k=13.0, sala_1m=31.0, peak_1m=23.5))
    assert set(t) == {"ttft_256k_speedup>=6", "prefill_1m_s<=30", "peak_1m_gib<=24"}
    assert t["ttft_256k_speedup>=6"] == {"value": 6.5, "met": True}
    assert t["prefill_1m_s<=30"] == {"value": 31.0, "met": False}
    assert t["peak_1m_gib<=24"] == {"value": 23.5, "met": True}


def test_fp8_targets_boundaries_and_misses():
    t = latency._targets(_payload("fp8", sala_256k=2.0, base_256k=12.0, sala_1m=30.0, peak_1m=24.0))
    assert all(v["met"] for v in t.values())                  # exactly on each threshold: met
    t = latency._targets(_payload("fp8", sala_256k=2.0, base_256k=11.0, sala_1m=29.0, peak_1m=24.2))
    assert t["ttft_256k_speedup>=6"] == {"value": 5.5, "met": False}
    assert t["prefill_1m_s<=30"]["met"] is True and t["peak_1m_gib<=24"]["met"] is False


def test_bf16_targets_unchanged():
    """The same numbers against the bf16 thresholds (also for a payload written before `quantization` existed)."""
    for q in ("none", None):
        t = latency._targets(_payload(q, sala_256k=2.0, base_256k=11.0, sala_1m=31.0, peak_1m=24.2, tps_1m=90.0))
        assert t == {"ttft_256k_speedup>=4.5": {"value": 5.5, "met": True},
                     "prefill_1m_s<=40": {"value": 31.0, "met": True},
                     "peak_1m_gib<=32": {"value": 24.2, "met": True},
                     "decode_1m_tok_s>=100": {"value": 90.0, "met": False},
                     "2m_completes": {"met": False}}


def test_fp8_targets_left_out_when_not_measured():
    p = _payload("fp8", sala_256k=2.0, base_256k=13.0, sala_1m=25.0, peak_1m=20.0)
    p["baseline"] = {}                                          # --no-baseline
    p["sala"][K1M] = {"status": "OOM", "peak_gib": 70.0}
    assert latency._targets(p) == {}


def _no_run(**kwargs):
    raise AssertionError("run() must not be reached when FP8 is unsupported")


def test_main_fp8_on_cpu_exits_with_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # a CPU machine, also where tests see a GPU
    monkeypatch.setattr(latency, "run", _no_run)
    out = tmp_path / "latency.json"
    with pytest.raises(SystemExit) as e:
        latency.main(["--quantization", "fp8", "--lengths", "256K,1M", "--decode-tokens", "64", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m sala.bench.latency: error: FP8 quantization is not supported here: ")
    assert "CUDA is not available" in err and "compute capability >= 8.9" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_main_fp8_on_pre_ada_gpu_exits(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fp8_ops, "fp8_support_problem",
                        lambda device: "cuda:0 is Tesla T4 (compute capability 7.5); FP8 needs 8.9 or newer")
    monkeypatch.setattr(latency, "run", _no_run)
    with pytest.raises(SystemExit) as e:
        latency.main(["--quantization", "fp8", "--out", str(tmp_path / "l.json")])
    assert e.value.code == 2 and "Tesla T4 (compute capability 7.5)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_fp8_refuses_before_writing(monkeypatch, tmp_path):
    """run() itself (the `sala bench latency` path) checks before building the baseline or writing the JSON."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8_ops, "fp8_support_problem", lambda device: "cuda:0 is an A100 (compute capability 8.0)")
    monkeypatch.setattr(latency, "build_qwen3_8b", lambda *a, **k: pytest.fail("baseline built"))
    out = tmp_path / "l.json"
    with pytest.raises(fp8_ops.Fp8UnsupportedError, match="compute capability 8.0"):
        latency.run([262144], 64, str(out), quantization="fp8")
    assert not out.exists()


@pytest.mark.parametrize("argv, want", [([], "none"), (["--quantization", "fp8"], "fp8")])
def test_main_passes_quantization_to_run(monkeypatch, tmp_path, argv, want):
    monkeypatch.setattr(fp8_ops, "fp8_support_problem", lambda device: None)   # an FP8-capable GPU
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(latency, "run", fake_run)
    assert latency.main(argv + ["--lengths", "1M", "--no-baseline", "--out", str(tmp_path / "l.json")]) == 0
    assert seen["quantization"] == want and seen["baseline"] is False


def test_bad_quantization_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        latency.main(["--quantization", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
