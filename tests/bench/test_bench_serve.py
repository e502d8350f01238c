"""`sala bench serve` on the CPU: the pure decode-step measurement leaves the engine as it was, the load
scenario's JSON carries it and the in-process `--offline` figure."""
from __future__ import annotations

import json
import random

import pytest
import torch

from sala.bench.serve import measure_decode_step
from sala.cli import main
from sala.engine.loading import random_model
from sala.engine.requests import Request
from sala.engine.sampling import SamplingParams
from sala.engine.scheduler import EngineCore
from sala.modeling.configuration_sala import SalaConfig

# sala-tiny selects sparse blocks from 96 tokens on: prompts and the measured context cover both regimes, and the
# generated tokens pass position CONTEXT, where the measurement wrote its stray keys.
PROMPTS = [90, 120, 40]
NEW = 16
CONTEXT = 100


def _greedy(core: EngineCore, prompts: list[list[int]]) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        core.add_request(Request(f"r{len(p)}-{i}", p, SamplingParams(max_new_tokens=NEW, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    for o in core.run_until_done():
        out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_measure_decode_step_leaves_the_engine_idle_and_its_tokens_unchanged():
    model = random_model(SalaConfig.from_preset("sala-tiny"), torch.device("cpu"), torch.float32, seed=0)
    core = EngineCore(model, None, max_num_seqs=4, max_model_len=256, chunk_size=64, enable_prefix_cache=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPTS]
    before = _greedy(core, prompts)
    assert all(len(t) == NEW for t in before.values())

    calls = core._steps[4]._run._calls
    step_s = measure_decode_step(core, 3, CONTEXT, steps=3, warmup=1)    # bucket 4: row 3 idle, as served
    assert step_s > 0
    assert not core.has_unfinished() and sorted(core.free_rows) == [0, 1, 2, 3]
    assert core.cache.lengths == [0, 0, 0, 0]
    assert not core.cache.seqlens.any() and not core.cache.states.any()
    assert core._steps[4]._run._calls == calls + 4                      # the engine's own bucket step ran

    assert _greedy(core, prompts) == before
    with pytest.raises(ValueError, match="context"):
        measure_decode_step(core, 2, core.cache.capacity)                  # no room for the step's token
    with pytest.raises(ValueError, match="batch"):
        measure_decode_step(core, 5, CONTEXT)
    core.add_request(Request("busy", prompts[0], SamplingParams(max_new_tokens=2)))
    with pytest.raises(RuntimeError, match="idle"):
        measure_decode_step(core, 1, CONTEXT)


def test_bench_serve_load_reports_the_decode_step_and_offline(tmp_path):
    out = tmp_path / "load.json"
    assert main(["bench", "serve", "--model", "sala-tiny", "--device", "cpu", "--num-requests", "4",
                 "--prompt-len", "40", "--output-len", "3", "--max-num-seqs", "4", "--sequential-baseline", "1",
                 "--offline", "--decode-steps", "2", "--out", str(out), "--plot", "none"]) == 0
    payload = json.loads(out.read_text())
    assert payload["results"]["output_tokens"] == 12 and payload["results"]["failed"] == 0
    off = payload["offline"]
    assert off["requests"] == 4 and off["output_tokens"] == 12
    assert off["output_tokens_per_s"] == pytest.approx(12 / off["wall_s"])
    base = payload["sequential_baseline"]["output_tokens_per_s"]
    assert payload["offline_speedup_vs_sequential"] == pytest.approx(off["output_tokens_per_s"] / base)
    d = payload["decode_floor"]
    assert (d["batch"], d["context"]) == (4, 42)                       # the scenario's batch, prompt + output - 1
    assert d["decode_step_s"] > 0 and d["decode_tokens_per_s"] == pytest.approx(4 / d["decode_step_s"])
    assert d["decode_step_mode"] == "eager"
    assert d["itl_p50_tokens_per_s"] == pytest.approx(4 / d["itl_p50_s"])
    assert d["itl_p50_s"] == pytest.approx(payload["results"]["itl_s"]["p50"])


def test_bench_serve_decode_shape_flags_and_offline_needs_the_load_in_process(tmp_path):
    out = tmp_path / "d.json"
    # a decode measurement larger than the load: batch 4 at 300 tokens (the default model length makes room)
    assert main(["bench", "serve", "--model", "sala-tiny", "--device", "cpu", "--num-requests", "1",
                 "--prompt-len", "16", "--output-len", "2", "--max-num-seqs", "4", "--decode-batch", "4",
                 "--decode-context", "300", "--decode-steps", "1", "--out", str(out), "--plot", "none"]) == 0
    payload = json.loads(out.read_text())
    assert (payload["decode_floor"]["batch"], payload["decode_floor"]["context"]) == (4, 300)
    assert "offline" not in payload and payload["engine"]["max_model_len"] == 301
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--vocab", "100", "--offline",
                 "--out", str(out)]) == 2
    assert main(["bench", "serve", "--model", "sala-tiny", "--scenario", "document", "--offline",
                 "--out", str(out)]) == 2
    assert main(["bench", "serve", "--model", "sala-tiny", "--decode-batch", "64", "--out", str(out)]) == 2


def test_bench_serve_interference_checks_the_long_prompt_ran_beside_the_streams(tmp_path):
    # The default pool holds the long prompt and the streams (with admission's spare pages): the long prompt (4
    # chunks, one per step) prefills while the streams decode their 24 tokens, and the run says so.
    out = tmp_path / "interference.json"
    assert main(["bench", "serve", "--model", "sala-tiny", "--device", "cpu", "--scenario", "interference",
                 "--streams", "2", "--prompt-len", "32", "--output-len", "24", "--long-prompt", "512",
                 "--chunk-size", "128", "--max-num-seqs", "3", "--no-prefix-cache", "--out", str(out),
                 "--plot", "none"]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["valid"] is True
    assert res["with_long_prefill"]["long_prompt"]["prefilled_while_streams_ran"] == 512
    assert res["with_long_prefill"]["long_prompt"]["error"] is None
    assert res["itl_p99_ratio"] > 0
