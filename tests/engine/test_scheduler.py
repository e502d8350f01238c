"""EngineCore (continuous batching) on the bundled model, CPU: same greedy tokens as each prompt alone, rows
that prefill or idle while others decode keep their state, admission, errors, abort, sampling and logprobs."""
from __future__ import annotations

import pytest
import torch

from sala.engine import SalaEngine, SamplingParams
from sala.engine.requests import QueueFullError, Request, RequestError
from sala.engine.scheduler import EngineCore
from sala.engine.static_cache import StaticCache
from sala.ops.infllmv2 import gather_paged
from sala.utils.bundled import bundled_model_dir

MODEL = bundled_model_dir()
pytestmark = pytest.mark.skipif(MODEL is None, reason="no bundled model in this installation")

LENGTHS = [1, 3, 7, 12, 20, 33, 45, 64, 65, 80, 100, 128, 150, 170, 190, 200]
NEW = 4


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return SalaEngine.from_pretrained(MODEL, device="cpu")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, 8000, (n - 1,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def alone(engine, prompts):
    sp = SamplingParams(max_new_tokens=NEW)
    return [engine.generate([p], sp, add_bos=False)[0].token_ids for p in prompts]


def run(core: EngineCore, reqs: list[Request], max_steps: int = 10_000) -> dict[str, list]:
    for r in reqs:
        core.add_request(r)
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            break
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
    assert not core.has_unfinished()
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("slots,budget", [(4, 96), (16, 256)])
def test_continuous_batching_gives_each_prompt_its_tokens_alone(engine, prompts, alone, slots, budget):
    # Small chunks and budget: long prompts prefill over several steps while the others decode.
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=slots, max_model_len=256, chunk_size=64,
                      max_tokens_per_step=budget, enable_prefix_cache=False)
    outs = run(core, [Request(str(i), p, SamplingParams(max_new_tokens=NEW)) for i, p in enumerate(prompts)])
    assert core.counters["prefill_chunks"] > len(prompts)          # some prompts took several chunks
    for i in range(len(prompts)):
        assert tokens(outs[str(i)]) == alone[i], f"prompt {i} ({LENGTHS[i]} tokens)"
        last = outs[str(i)][-1]
        assert last.finished and last.finish_reason in ("stop", "length")
        assert sum(o.finished for o in outs[str(i)]) == 1
    st = core.stats()
    assert st["running"] == st["waiting"] == st["prefilling"] == 0 and st["free_slots"] == slots
    assert st["cache_pages_used"] == 0
    assert st["prompt_tokens_total"] == sum(LENGTHS)


def test_prefilling_row_keeps_its_state_while_others_decode(engine, prompts):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=2, max_model_len=256, chunk_size=64,
                      max_tokens_per_step=64, enable_prefix_cache=False)
    core.add_request(Request("short", prompts[2], SamplingParams(max_new_tokens=50, ignore_eos=True)))
    core.step()                                                   # short prefilled; decodes from now on
    long = prompts[-1]
    core.add_request(Request("long", long, SamplingParams(max_new_tokens=2)))
    core.step()                                                   # decode + the long prompt's first chunk
    s = core.active["long"]
    assert s.status == "prefill" and core.cache.lengths[s.row] == 64
    core.step()                                                   # a decode step runs with the long row mid-prompt
    assert core.counters["decode_steps"] == 2 and core.cache.lengths[s.row] == 128
    ref = StaticCache(engine.config, 1, 256, engine.dtype, "cpu")
    for a in (0, 64):
        engine.runner.prefill_chunk(torch.tensor(long[a:a + 64]), ref, 0)
    assert torch.equal(core.cache.states[:, s.row], ref.states[:, 0])
    for layer, buf in ref.sparse.items():
        assert torch.equal(gather_paged(core.cache.sparse[layer].k, core.cache.block_table[s.row], 128), buf.k[:, :128])
    assert int(core.cache.seqlens[s.row]) == 128
    idle = [r for r in range(2) if r not in (s.row, core.active["short"].row)]
    assert all(int(core.cache.seqlens[r]) == 0 for r in idle)


def test_waits_for_a_free_slot_and_refuses_what_never_fits(engine, prompts):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=2, max_model_len=128, max_waiting=2,
                      chunk_size=128)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    early = []
    for i in range(4):
        core.add_request(Request(f"r{i}", prompts[i], sp))
        if i == 1:
            early += core.step()                                  # r0, r1 take both slots
    st = core.stats()
    assert st["waiting"] == 2 and st["running"] == 2 and st["free_slots"] == 0
    early += core.step()
    assert core.stats()["waiting"] == 2                           # no free slot: they wait
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        core.add_request(Request("r5", prompts[0], sp))
    with pytest.raises(RequestError, match=r"120 tokens\) plus max_new_tokens \(9\) is 129 .* 128"):
        core.add_request(Request("big", [5] * 120, SamplingParams(max_new_tokens=9)))
    with pytest.raises(RequestError, match="empty"):
        core.add_request(Request("e", [], sp))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        core.add_request(Request("v", [1, 99999], sp))
    with pytest.raises(RequestError, match="already in use"):
        core.add_request(Request("r0", [1, 2], sp))
    outs = run(core, [])
    for o in early:
        outs[o.request_id].insert(0, o)
    assert sorted(outs) == ["r0", "r1", "r2", "r3"]
    assert all(len(tokens(o)) == 3 for o in outs.values())


def test_admission_waits_for_pages(engine, prompts, alone):
    # A pool of 6 pages (384 tokens) for 4 rows of up to 256 tokens: requests are admitted while their prompt and
    # max_new_tokens fit the free pages (the 200-token prompt needs 4 of them), the rest wait; every request gets
    # exactly its tokens alone, and every page comes back.
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=256, chunk_size=128,
                      kv_cache_tokens=384, enable_prefix_cache=False)
    assert core.pool.num_pages == 6 and core.stats()["cache_pages_total"] == 6
    order = [15, 14, 11, 5, 0, 13]                                   # 200, 190, 128, 33, 1, 170 tokens
    for i in order:
        core.add_request(Request(str(i), prompts[i], SamplingParams(max_new_tokens=NEW)))
    outs: dict[str, list] = {}
    most_running = 0
    for _ in range(1000):
        if not core.has_unfinished():
            break
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
        st = core.stats()
        assert st["cache_pages_used"] + st["cache_pages_free"] <= 6
        most_running = max(most_running, st["running"] + st["prefilling"])
        if st["waiting"]:
            assert st["free_slots"] > 0 or most_running == 4                 # waiting on pages, not only rows
    assert 1 < most_running < 4
    for i in order:
        assert tokens(outs[str(i)]) == alone[i], i
    st = core.stats()
    assert st["cache_pages_used"] == 0 and st["cache_pages_free"] == 6
    assert core.cache.block_table.abs().sum() == 0                           # every row's blocks unmapped
    with pytest.raises(ValueError, match=r"kv_cache_tokens \(384\) must hold at least one sequence of max_model_len "
                                         r"\(512 tokens, 8 pages of 64\)"):
        EngineCore(engine.model, engine.tokenizer, max_num_seqs=2, max_model_len=512, kv_cache_tokens=384)
    with pytest.raises(ValueError, match="kv_cache_tokens must be >= the page size"):
        EngineCore(engine.model, engine.tokenizer, max_num_seqs=1, max_model_len=256, kv_cache_tokens=10)


@pytest.mark.parametrize("prefix_cache,names,spec", [(False, "g0 g1 s2 p3", None), (True, "g0 g1 s2 p3", None),
                                                     (False, "g0 s2", None), (True, "g0 g1", "ngram")])
def test_preempted_requests_resume_exactly(engine, prompts, prefix_cache, names, spec, caplog):
    # A pool of one row (4 pages of 64) for 4 rows: every request grows past what the others leave, so the newest
    # is preempted (row and pages given back) and later prefills its prompt and output again and decodes on.
    # Greedy, seeded-sampling and prompt-logprob requests each get exactly what they get alone.
    reqs = [Request("g0", prompts[6], SamplingParams(max_new_tokens=90, ignore_eos=True)),
            Request("g1", prompts[9], SamplingParams(max_new_tokens=70, ignore_eos=True)),
            Request("s2", prompts[5], SamplingParams(max_new_tokens=100, temperature=0.9, seed=7, ignore_eos=True)),
            Request("p3", prompts[7], SamplingParams(max_new_tokens=60, ignore_eos=True), prompt_logprobs=2,
                    logprobs=1)]
    reqs = [r for r in reqs if r.request_id in names.split()]
    victim = "s2" if names == "g0 s2" else "g1"        # the most recently admitted request when the pool runs out

    def serve(batch: list[Request], **kw) -> tuple[dict, EngineCore]:
        core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=256, chunk_size=64,
                          enable_prefix_cache=prefix_cache, speculative=spec, **kw)
        return run(core, [Request(r.request_id, r.prompt_ids, r.params, prompt_logprobs=r.prompt_logprobs,
                                  logprobs=r.logprobs) for r in batch]), core

    with caplog.at_level("INFO", logger="sala.engine.scheduler"):
        squeezed, core = serve(reqs, kv_cache_tokens=256)
    assert core.counters["preemptions"] >= 1
    assert f"preempting request {victim}" in caplog.text
    assert (core.counters["spec_verify_steps"] > 0) == (spec is not None)
    for r in reqs:
        alone, _ = serve([r])
        got, want = squeezed[r.request_id], alone[r.request_id]
        assert tokens(got) == tokens(want), r.request_id
        assert "".join(o.new_text for o in got) == "".join(o.new_text for o in want)
        assert sum(o.finished for o in got) == 1 and got[-1].finish_reason == "length"
        plp = [o.prompt_logprobs for o in got if o.prompt_logprobs is not None]
        if r.prompt_logprobs is not None:
            want_plp = next(o.prompt_logprobs for o in want if o.prompt_logprobs is not None)
            assert len(plp) == 1 and len(plp[0]) == len(r.prompt_ids) == len(want_plp)
            for a, b in zip(plp[0][1:], want_plp[1:]):
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
            lps = [lp for o in got for lp in o.new_logprobs]
            assert len(lps) == 60
    st = core.stats()
    assert st["cache_pages_used"] == 0 and st["running"] == st["waiting"] == 0
    assert st["prompt_tokens_total"] == sum(len(r.prompt_ids) for r in reqs)      # re-admissions not counted


def test_follow_ups_share_the_cached_pages(engine, prompts):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=2, max_model_len=384, chunk_size=128)
    document = prompts[-1] + prompts[-2]                                      # 390 tokens: 6 full pages
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    run(core, [Request("first", document[:300] + [7, 8], sp)])
    held = core.stats()["prefix_cache_pages"]
    assert held >= 4 and core.pool.num_used == held                           # pages kept by the cache only
    core.add_request(Request("second", document[:300] + [9, 10, 11], sp))
    core.step()
    s = core.active["second"]
    shared = core.cache.row_pages[s.row][:s.num_cached // 64]
    assert s.num_cached >= 256 and all(core.pool.refs[q] == 2 for q in shared)  # the cache's and the row's
    run(core, [])
    assert core.stats()["cache_pages_used"] == 0 and all(core.pool.refs[q] == 1 for q in shared)


@pytest.mark.parametrize("when", ["prefill", "decode", "waiting"])
def test_abort_frees_the_row(engine, prompts, when):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=1, max_model_len=320, chunk_size=64,
                      max_tokens_per_step=64)
    idle = core.stats()
    sp = SamplingParams(max_new_tokens=100, ignore_eos=True)
    core.add_request(Request("a", prompts[-1], sp))
    core.add_request(Request("b", prompts[3], SamplingParams(max_new_tokens=2, ignore_eos=True)))
    core.step()
    if when == "decode":
        while core.active["a"].status != "running":
            core.step()
        core.step()
    assert core.active["a"].status == ("running" if when == "decode" else "prefill")
    core.abort("b" if when == "waiting" else "a")
    out = core.step()
    aborted = [o for o in out if o.finish_reason == "abort"]
    assert len(aborted) == 1 and aborted[0].finished
    if when != "waiting":
        assert core.stats()["free_slots"] == 0 and "b" in core.active     # b took the row at once
        core.abort("b")
        core.step()
    else:
        core.abort("a")
        core.step()
    core.abort("unknown")                                          # ignored
    assert not core.has_unfinished()
    st = core.stats()
    for key in ("running", "prefilling", "waiting", "free_slots", "cache_pages_used", "prefix_cache_refs"):
        assert st[key] == idle[key], key
    assert st["requests_aborted"] == 2


def test_sampling_seed_logprobs_and_stop_strings(engine, prompts):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=3, max_model_len=256, chunk_size=64)
    seeded = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    expect = engine.generate([prompts[5]], seeded, add_bos=False)[0]
    greedy = engine.generate([prompts[6]], SamplingParams(max_new_tokens=8, ignore_eos=True), add_bos=False)[0]
    stop = engine.tokenizer.decode(greedy.token_ids[3:5]).strip()
    outs = run(core, [Request("s", prompts[5], seeded),
                      Request("lp", prompts[4], SamplingParams(max_new_tokens=3, ignore_eos=True), logprobs=3,
                              prompt_logprobs=2),
                      Request("stop", prompts[6], SamplingParams(max_new_tokens=8, ignore_eos=True, stop=[stop]))])
    assert tokens(outs["s"]) == expect.token_ids
    # logprobs: the chosen token's and the top 3 of the model's distribution (greedy: chosen is the top one)
    lps = [lp for o in outs["lp"] for lp in (o.new_logprobs or [])]
    assert [lp.token_id for lp in lps] == tokens(outs["lp"])
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    # prompt logprobs: what the model's own forward gives for each prompt token, first one None
    plp = outs["lp"][0].prompt_logprobs
    p = prompts[4]
    assert len(plp) == len(p) and plp[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(engine.model(torch.tensor([p])).logits[0].float(), dim=-1)
    for j in range(1, len(p)):
        assert plp[j].token_id == p[j]
        assert plp[j].logprob == pytest.approx(ref[j - 1, p[j]].item(), abs=1e-4)
        assert len(plp[j].top) == 2
    assert all(o.prompt_logprobs is None for o in outs["lp"][1:])
    # stop string: text cut before it, finish "stop"
    text = "".join(o.new_text for o in outs["stop"])
    assert outs["stop"][-1].finish_reason == "stop" and stop not in text
    assert engine.tokenizer.decode(greedy.token_ids).startswith(text)


def test_incremental_detokenization_gives_the_full_decode(engine):
    from types import SimpleNamespace

    tok = engine.tokenizer
    text = "Héllo wörld — naïve café 😀 数据 and\nnew   lines, ünïcödé 🎉!"
    ids = tok.encode(text)
    core = SimpleNamespace(tokenizer=tok)
    s = SimpleNamespace(output_ids=[], prefix_offset=0, read_offset=0, text="")
    seen = []
    for i, t in enumerate(ids):
        s.output_ids.append(t)
        seen.append(EngineCore._detokenize(core, s, final=i == len(ids) - 1))
        assert not seen[-1].endswith("\ufffd")
        assert tok.decode(s.output_ids).startswith(seen[-1])       # never shows text that changes later
    assert seen[-1] == tok.decode(ids)


def test_unseeded_rows_sample_together_and_stay_in_their_filters(engine, prompts):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=128, chunk_size=64)
    torch.manual_seed(3)
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=2, ignore_eos=True)
    outs = run(core, [Request(f"r{i}", prompts[4 + i], sp, logprobs=2) for i in range(4)])
    for i in range(4):
        lps = [lp for o in outs[f"r{i}"] for lp in (o.new_logprobs or [])]
        assert len(lps) == 4
        for lp in lps:                                             # top_k=2: always one of the two most likely
            assert lp.token_id in [t for t, _ in lp.top]


def test_a_short_prompt_is_not_held_back_by_a_long_prefill(engine, prompts):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=2, max_model_len=256, chunk_size=64,
                      max_tokens_per_step=64, enable_prefix_cache=False)
    core.add_request(Request("long", prompts[-1], SamplingParams(max_new_tokens=1)))     # 200 tokens: 4 chunks
    core.step()
    core.add_request(Request("short", prompts[3], SamplingParams(max_new_tokens=1)))
    out = core.step()                                                  # the short prompt's chunk goes first
    assert [o.request_id for o in out] == ["short"] and out[0].finished
    assert core.active["long"].status == "prefill"


def test_a_long_prompt_runs_full_chunks_while_others_decode(engine, prompts):
    # Budget 128 prompt tokens per step, pages of 64: while a request decodes, the long prompt (200 tokens) still
    # gets whole 128-token chunks (the decode token comes on top of the budget), then its 72-token tail.
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=2, max_model_len=256, chunk_size=128,
                      max_tokens_per_step=128, enable_prefix_cache=False)
    core.add_request(Request("decoding", prompts[4], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    core.step()                                                        # its prompt (20 tokens) in one chunk
    core.add_request(Request("long", prompts[-1], SamplingParams(max_new_tokens=1)))
    before = core.counters["prefill_chunks"]
    core.step()
    assert core.counters["prefill_chunks"] - before == 1 and core.active["decoding"].status == "running"
    assert core.cache.lengths[core.active["long"].row] == 128
    out = core.step()                                                  # the tail: its first (and only) token
    assert any(o.request_id == "long" and o.finished for o in out)


def test_chunk_lengths_repeat_across_many_prompts(engine):
    # 12 prompts of 320 tokens, chunks of 128, 6 rows: every chunk is a full 128 or the 64-token tail, however
    # many rows decode and whatever budget is left in a step (no slivers that fill the budget exactly).
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=6, max_model_len=384, chunk_size=128,
                      enable_prefix_cache=False)
    seen: list[int] = []
    prefill = core._prefill

    def record(s, end):
        seen.append(end - core.cache.lengths[s.row])
        return prefill(s, end)

    core._prefill = record
    g = torch.Generator().manual_seed(0)
    reqs = [Request(str(i), torch.randint(3, engine.config.vocab_size, (320,), generator=g).tolist(),
                    SamplingParams(max_new_tokens=6, ignore_eos=True)) for i in range(12)]
    outs = run(core, reqs)
    assert sorted(set(seen)) == [64, 128] and seen.count(64) == 12
    assert all(sum(len(o.new_token_ids) for o in outs[r.request_id]) == 6 for r in reqs)


def test_kv_cache_tokens_for_leaves_admissions_spare_pages():
    from sala.engine.scheduler import admission_spare_pages, kv_cache_tokens_for

    for tokens in (1, 64, 1024, 6336, 6400, 1_063_937):
        pages = kv_cache_tokens_for(tokens, 64) // 64
        need = -(-tokens // 64)
        assert pages - admission_spare_pages(pages) >= need                     # fits with the spare
        assert (pages - 1) - admission_spare_pages(pages - 1) < need             # and no page more than that


def test_step_graph_capture_checks_its_batch_sizes_and_is_a_no_op_on_the_cpu(engine):
    core = EngineCore(engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=256)
    with pytest.raises(ValueError, match=r"batch sizes must be in \[1, max_num_seqs = 4\], got \[5\]"):
        core.capture_step_graphs([5])
    assert core.capture_step_graphs([1, 3]) == [] and core._steps == {}     # CPU: steps run eagerly when used
