"""experiments/profiling/serve_step.py on the CPU (tiny preset): decode-only steps, then mixed steps at each
requested context of the long prompt, split into their decode and prefill parts."""
from __future__ import annotations

import json


def test_serve_step_splits_steps_by_context(load_script, tmp_path):
    script = load_script("serve_step")
    out = tmp_path / "serve_step.json"
    assert script.main(["--preset", "sala-tiny", "--device", "cpu", "--contexts", "512,1K", "--chunk-size", "64",
                        "--fill-chunk", "128", "--steps", "2", "--streams", "2", "--stream-prompt", "32",
                        "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    r = d["results"]
    assert r["decode_only"]["step"]["n"] == 2 and r["decode_only"]["prefill"]["median_ms"] == 0.0
    assert list(r["mixed_by_context"]) == ["512", "1024"]
    for c, m in r["mixed_by_context"].items():
        assert m["context_at_start"] >= int(c)                      # filled up to the context before timing
        assert m["prefill"]["median_ms"] > 0 and m["decode"]["median_ms"] > 0     # both parts ran every step
        assert m["step"]["median_ms"] >= m["prefill"]["median_ms"]
        assert m["host_per_step"]["aten_calls"] > 0
