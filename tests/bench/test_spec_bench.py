"""`sala bench spec` on the CPU: the tasks build, speculative and plain decoding give the same tokens, JSON written."""
from __future__ import annotations

import json

from sala.cli import main


def test_bench_spec_writes_identical_outputs_and_acceptance(tmp_path):
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--tasks", "quote,vt", "--lengths", "512", "--num-samples", "1",
                 "--max-new-tokens", "8", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["task"] for r in payload["results"]] == ["quote", "vt"]
    assert payload["summary"]["all_identical"] is True
    for r in payload["results"]:
        assert r["identical"] and r["output_tokens"] > 0
        s = r["speculative"]
        assert 0 <= s["accepted_tokens"] <= s["draft_tokens"] and s["verify_steps"] >= 1
