"""`sala bench spec` on the CPU: the tasks build, speculative and plain decoding give the same tokens, JSON written."""
from __future__ import annotations

import json

from sala.cli import main


def test_bench_spec_writes_identical_outputs_and_acceptance(tmp_path):
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--tasks", "quote,vt", "--lengths", "512", "--num-samples", "1",
                 "--max-new-tokens", "8", "--repeats", "2", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["task"] for r in payload["results"]] == ["quote", "vt"]
    assert payload["summary"]["all_identical"] is True
    for r in payload["results"]:
        assert r["identical"] and r["output_tokens"] > 0
        runs = r["plain_tokens_per_s_runs"]       # the median of the repeated runs (two: the upper one)
        assert len(runs) == len(r["spec_tokens_per_s_runs"]) == 2 and r["plain_tokens_per_s"] == max(runs)
        assert r["identical_runs"] == 2
        s = r["speculative"]
        assert 0 <= s["accepted_tokens"] <= s["draft_tokens"] and s["verify_steps"] >= 1


def test_divergence_reports_plain_top2_at_the_first_differing_token():
    from sala.bench.spec import _decode_run, divergence
    from sala.engine.scheduler import EngineCore
    from sala.utils.bundled import bundled_model_dir

    core = EngineCore.from_pretrained(str(bundled_model_dir()), device="cpu", max_num_seqs=1, max_model_len=256,
                                      enable_prefix_cache=False)
    ids = core.tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_bos=True)
    plain = _decode_run(core, ids, 6)["tokens"]
    assert divergence(core, ids, 6, plain, list(plain)) is None
    other = plain[:3] + [(plain[3] + 1) % core.model.config.vocab_size] + plain[4:]
    d = divergence(core, ids, 6, plain, other)
    assert d["position"] == 3 and d["plain_token"] == plain[3] and d["other_token"] == other[3]
    a, b = d["plain_top2_logprobs"]
    assert a >= b and d["top2_gap"] == a - b >= 0
    # a shorter output differs where it ends
    assert divergence(core, ids, 6, plain, plain[:4])["position"] == 4
