"""scripts/ab_engine.py: every setting really applied while measured, interleaved order, medians per setting."""
from __future__ import annotations

import json
import os

import pytest


def test_ab_engine_applies_each_setting_and_summarises(tmp_path, monkeypatch, load_script):
    pytest.importorskip("triton")
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils

    ab = load_script("ab_engine")
    monkeypatch.setitem(triton_utils.TUNING, "band_split", True)
    for env in ("SALA_SPARSE_DECODE", "SALA_SPARSE_DECODE_SELECT"):
        monkeypatch.setenv(env, "default")
    seen = []

    def fake_measure(engine, n, decode_tokens, seed):
        band, dec, sel = triton_utils.TUNING["band_split"], os.environ["SALA_SPARSE_DECODE"], os.environ["SALA_SPARSE_DECODE_SELECT"]
        seen.append((n, band, dec, sel))
        # a setting-dependent result, so the medians can be checked per setting
        return {"status": "ok", "ttft_s": n / 1000 + (0.0 if band else 0.5),
                "decode_tokens_per_s": 100.0 if sel == "split" else 50.0}

    out = tmp_path / "ab.json"
    p = ab.run([1000, 2000], 2, 8, "unused", str(out), measure=fake_measure, engine=object())
    assert len(seen) == 4 + 2 * 2 * 4                          # warm-up per setting, then lengths x reps x settings
    assert {(b, d, s) for _, b, d, s in seen} == {(True, "splitk", "split"), (True, "single", "single"),
                                                   (False, "splitk", "split"), (False, "single", "single")}
    first_rep = [x[1:] for x in seen[4:8]]
    second_rep = [x[1:] for x in seen[8:12]]
    assert second_rep == first_rep[::-1]                       # interleaved: the second repetition runs reversed
    s = json.loads(out.read_text())["summary"]
    assert s["2000/band_off+decode_single"] == {"ttft_s_median": 2.5, "decode_tokens_per_s_median": 50.0}
    assert s["1000/band_on+decode_split"] == {"ttft_s_median": 1.0, "decode_tokens_per_s_median": 100.0}
    assert p["settings"] == [ab._name(x) for x in ab.SETTINGS]
    assert triton_utils.TUNING["band_split"] is True and os.environ["SALA_SPARSE_DECODE"] == "default"   # restored


def test_ab_engine_fused_axis_swaps_the_runners_ops_and_restores_them(monkeypatch, load_script):
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from sala.engine.forward import EAGER_OPS, REFERENCE_OPS

    ab = load_script("ab_engine")
    engine = SimpleNamespace(runner=SimpleNamespace(ops="prefill-ops", decode_ops="decode-ops"))
    seen = []

    def fake_measure(eng, n, decode_tokens, seed):
        seen.append((eng.runner.ops, eng.runner.decode_ops))
        return {"status": "ok", "ttft_s": 1.0 if eng.runner.ops is EAGER_OPS else 2.0, "decode_tokens_per_s": 9.0}

    p = ab.run([1000], 1, 8, "unused", None, measure=fake_measure, engine=engine, axes=("fused",))
    assert p["settings"] == ["fused_on", "fused_off"] and p["axes"] == ["fused"]
    assert seen[2:] == [(EAGER_OPS, EAGER_OPS), (REFERENCE_OPS, REFERENCE_OPS)]
    assert p["summary"]["1000/fused_off"]["ttft_s_median"] == 2.0
    assert (engine.runner.ops, engine.runner.decode_ops) == ("prefill-ops", "decode-ops")     # restored
    with pytest.raises(ValueError, match="unknown axes"):
        ab.settings_for(("fused", "bogus"))
