"""EngineCore on a CUDA GPU: CUDA-graph decode per batch-size bucket, continuous batching equal to each prompt
alone (fp32, so no batch-dependent bf16 rounding decides a token), prefix cache on/off equal (fp32) at the
9B layer shapes with sparse selection active, and rows mid-prefill unharmed by graph-replayed decode steps."""
from __future__ import annotations

import pytest
import torch

from sala.engine import SalaEngine, SamplingParams
from sala.engine.requests import Request
from sala.engine.scheduler import EngineCore
from sala.utils.bundled import bundled_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(core: EngineCore, reqs: list[Request]) -> dict[str, list[int]]:
    for r in reqs:
        core.add_request(r)
    got: dict[str, list[int]] = {}
    for o in core.run_until_done():
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return got


@pytest.mark.skipif(bundled_model_dir() is None, reason="no bundled model")
def test_graph_buckets_and_batching_equal_alone():
    engine = SalaEngine.from_pretrained(bundled_model_dir(), device="cuda", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    lengths = [3, 40, 64, 65, 200, 700, 1500, 2500, 3000, 17, 90, 128, 256, 999, 2100, 33]
    prompts = [[1] + torch.randint(3, 8000, (n - 1,), generator=g).tolist() for n in lengths]
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = [engine.generate([p], sp, add_bos=False)[0].token_ids for p in prompts]
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=8, max_model_len=4096, chunk_size=256,
                      max_tokens_per_step=384)
    # every bucket's decode graph was captured at start, on idle rows that were then reset
    assert sorted(core._steps) == [1, 2, 4, 8]
    graphs = {b: st._run.graph for b, st in core._steps.items()}
    assert all(g is not None for g in graphs.values()) and not core.cache.states.any()
    got = _run(core, [Request(str(i), p, sp) for i, p in enumerate(prompts)])
    assert [got[str(i)] for i in range(len(prompts))] == alone
    # a request alone in the same engine: row 0, the one-row graph, the same tokens
    assert _run(core, [Request("solo", prompts[1], sp)])["solo"] == alone[1]
    assert {b: st._run.graph for b, st in core._steps.items()} == graphs      # no capture while serving
    st = core.stats()
    assert st["free_slots"] == 8 and st["cache_pages_used"] == 0 and st["prefix_cache_refs"] == 0


def test_prefix_cache_same_answers_at_9b_layer_shapes():
    overrides = {"num_hidden_layers": 4, "mixer_types": ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"],
                 "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "topk": 4,
                                   "init_blocks": 1, "window_size": 256, "dense_len": 512}}
    engine = SalaEngine.from_preset("minicpm-sala-9b", random_weights=True, device="cuda", dtype="fp32", seed=1,
                                    config_overrides=overrides)
    g = torch.Generator().manual_seed(1)
    document = torch.randint(3, engine.config.vocab_size, (6000,), generator=g).tolist()
    questions = [torch.randint(3, engine.config.vocab_size, (n,), generator=g).tolist() for n in (20, 35, 50)]
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    answers = []
    for enable in (True, False):
        core = EngineCore(engine.model, None, max_num_seqs=4, max_model_len=8192, chunk_size=1024,
                          enable_prefix_cache=enable)
        per_q = []
        for i, q in enumerate(questions):
            per_q.append(_run(core, [Request(f"q{i}", document + q, sp)])[f"q{i}"])
        answers.append(per_q)
        if enable:
            # q1 restores the last chunk end in the document (5120) and ends a chunk where it leaves the cached
            # pages (5952, the document's last full page); q2 restores that.
            assert core.stats()["prefix_cache_hits"] == 5120 + 5952
    assert answers[0] == answers[1]


@pytest.mark.skipif(bundled_model_dir() is None, reason="no bundled model")
def test_graphed_verify_steps_give_the_plain_greedy_tokens():
    # fp32: speculation (CUDA-graph verify steps and rollbacks per bucket and T) emits exactly plain decoding's
    # tokens, batched, on repetitive prompts where n-gram drafts are accepted.
    engine = SalaEngine.from_pretrained(bundled_model_dir(), device="cuda", dtype="fp32")
    g = torch.Generator().manual_seed(3)
    prompts = []
    for n in (300, 900, 1700):
        phrase = torch.randint(3, 8000, (37,), generator=g).tolist()
        prompts.append([1] + (phrase * (n // 37 + 1))[:n - 1])
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = EngineCore(engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=2048, chunk_size=512)
    spec = EngineCore(engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=2048, chunk_size=512,
                      speculative="ngram", num_speculative_tokens=6)
    reqs = lambda: [Request(str(i), p, sp) for i, p in enumerate(prompts)]  # noqa: E731
    assert _run(spec, reqs()) == _run(plain, reqs())
    st = spec.stats()
    assert st["spec_verify_steps"] > 0 and st["spec_accepted_tokens_total"] > 0
    # captured at start for every bucket and verify size; serving added none
    assert sorted(spec._verify_steps) == [(b, T) for b in (1, 2, 4) for T in spec.verify_sizes]
    assert all(v.mode == "cuda-graph" and v._rollback.mode == "cuda-graph" and v._run.graph is not None
               for v in spec._verify_steps.values())
