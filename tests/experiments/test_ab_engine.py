"""experiments/profiling/ab_engine.py: every setting really applied while measured, interleaved order, medians per
setting."""
from __future__ import annotations

import json

import pytest


def test_ab_engine_applies_each_setting_and_summarises(tmp_path, load_script):
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from sala.engine.forward import EAGER_OPS

    ab = load_script("ab_engine")
    engine = SimpleNamespace(runner=SimpleNamespace(ops="prefill-ops", decode_ops="decode-ops"))
    seen = []

    def fake_measure(eng, n, decode_tokens, seed):
        fused = eng.runner.ops is EAGER_OPS
        seen.append((n, fused))
        # a setting-dependent result, so the medians can be checked per setting
        return {"status": "ok", "ttft_s": n / 1000 + (0.0 if fused else 0.5),
                "decode_tokens_per_s": 100.0 if fused else 50.0}

    out = tmp_path / "ab.json"
    p = ab.run([1000, 2000], 2, 8, "unused", str(out), measure=fake_measure, engine=engine)
    assert len(seen) == 2 + 2 * 2 * 2                          # warm-up per setting, then lengths x reps x settings
    first_rep = [x[1] for x in seen[2:4]]
    second_rep = [x[1] for x in seen[4:6]]
    assert second_rep == first_rep[::-1]                       # interleaved: the second repetition runs reversed
    s = json.loads(out.read_text())["summary"]
    assert s["2000/fused_off"] == {"ttft_s_median": 2.5, "decode_tokens_per_s_median": 50.0}
    assert s["1000/fused_on"] == {"ttft_s_median": 1.0, "decode_tokens_per_s_median": 100.0}
    assert p["settings"] == [ab._name(x) for x in ab.SETTINGS]


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
