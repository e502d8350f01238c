"""Speculative decoding, CPU: drafts, acceptance (greedy and rejection sampling against synthetic p and q),
exact rollback of a StaticCache row after a verify step with rejections, and EngineCore greedy outputs equal with
and without speculation (n-gram and draft models; batched and alone) on a tiny model whose decoding crosses the
dense/sparse threshold and K1/K2 window boundaries."""
from __future__ import annotations

import math

import pytest
import torch

from sala.engine.forward import DecodeStep, ModelRunner
from sala.engine.loading import random_model
from sala.engine.requests import Request
from sala.engine.sampling import SamplingParams, sampling_probs
from sala.engine.scheduler import EngineCore
from sala.engine.speculative import (
    AdaptiveK,
    ModelDrafter,
    NgramDrafter,
    StepCosts,
    VerifyStep,
    accept_drafts,
    expected_tokens,
    make_drafter,
)
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.ops.infllmv2 import compressed_lengths

# sala-tiny: K1 windows of 8 keys every 4, K2 windows of 32 every 16, dense below 128 tokens.
CFG = SalaConfig.from_preset("sala-tiny")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, torch.device("cpu"), torch.float32, seed=0)


@pytest.fixture(scope="module")
def other_model():
    return random_model(CFG, torch.device("cpu"), torch.float32, seed=1)


def _repetitive(n: int, seed: int) -> list[int]:
    """A prompt of n tokens that repeats a random phrase (n-gram drafts find matches in it)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, CFG.vocab_size, (23,), generator=g).tolist()
    return [1] + (phrase * (n // len(phrase) + 1))[:n - 1]


# ------------------------------------------------------------------------------------------------ drafts
def test_ngram_proposes_what_followed_the_most_recent_longest_match():
    d = NgramDrafter(max_n=3, min_n=1)
    ctx = [5, 6, 7, 8, 9, 1, 6, 7, 4, 4, 5, 6, 7]
    # Tail [5, 6, 7] occurs at 0 (followed by 8, 9); [6, 7] also at 6 but the 3-gram wins.
    assert d.propose(ctx, 2) == [8, 9]
    # Tail [7] only: the most recent earlier 7 is at 7, followed by 4, 4, 5.
    assert d.propose([1, 7, 2, 9, 7, 4, 4, 5, 3, 7], 3) == [4, 4, 5]
    assert d.propose([1, 2, 3], 4) == []          # no match
    # a match that runs into the context's end copies on over its own drafts: the repeating tail continues
    assert d.propose([1, 2, 1], 5) == [2, 1, 2, 1, 2]
    assert d.propose([4, 9, 3, 5, 3, 5], 5) == [3, 5, 3, 5, 3]
    assert d.propose([4, 9, 3, 5, 3, 5], 2) == [3, 5]
    assert d.propose([1, 2, 1], 0) == []
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(max_n=1, min_n=2)
    with pytest.raises(ValueError, match="ngram"):
        make_drafter("lookahead")


def _lookup_by_scan(ctx: list[int], k: int, max_n: int, min_n: int = 1) -> list[int]:
    """Prompt lookup by definition: the longest tail n-gram with an earlier occurrence followed by a token, the
    most recent such occurrence, the k tokens after it (the context extended by copying past its end)."""
    L = len(ctx)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        for s in range(L - n - 1, -1, -1):
            if ctx[s:s + n] == ctx[L - n:]:
                out = list(ctx)           # the copy goes on over its own tokens past the end (overlapping)
                while len(out) < s + n + k:
                    out.append(out[len(out) - (L - s - n)])
                return out[s + n:s + n + k]
    return []


def test_incremental_ngram_index_equals_the_scan_as_the_context_grows():
    g = torch.Generator().manual_seed(4)
    d = NgramDrafter(max_n=3)
    for vocab in (3, 6):
        ctx = torch.randint(0, vocab, (40,), generator=g).tolist()
        state = d.start(ctx[:10])
        for i in range(10, len(ctx) + 1):
            for k in (1, 4):
                assert state.propose(k) == _lookup_by_scan(ctx[:i], k, 3) == d.propose(ctx[:i], k)
            if i < len(ctx):
                state.extend([ctx[i]])


def test_model_drafter_proposes_the_draft_models_greedy_tokens(model):
    ctx = _repetitive(20, 3)
    drafts = ModelDrafter(model).propose(ctx, 3)
    ids = list(ctx)
    for _ in range(3):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert drafts == ids[len(ctx):]


def _best_k_by_search(alpha: float, max_k: int, cost: float, margin: float = 1.05) -> int:
    rates = {k: sum(alpha ** j for j in range(k + 1)) / (1 + cost * k) for k in range(max_k + 1)}
    k = max(rates, key=lambda k: (rates[k], -k))
    return k if k and rates[k] >= margin else 0


def test_adaptive_k_maximizes_expected_tokens_per_unit_cost():
    # With alpha known, k is the argmax of E(k) / r(k); cheap drafts (GPU) allow long ones, costly ones (CPU) few.
    for cost in (0.03, 0.35):
        for alpha in (0.05, 0.2, 0.5, 0.8, 0.95):
            a = AdaptiveK(8, cost, prior=alpha, prior_weight=1e9)
            assert a.k == _best_k_by_search(alpha, 8, cost), (cost, alpha, a.k)
    assert AdaptiveK(8, 0.03, prior=0.95, prior_weight=1e9).k == 8
    assert AdaptiveK(8, 0.35, prior=0.95, prior_weight=1e9).k < 8
    assert AdaptiveK(8, 0.03, prior=0.02, prior_weight=1e9).k == 0          # drafts never pay: decode plainly
    assert expected_tokens(0.5, 2) == 1.75


def test_adaptive_k_backs_off_to_plain_decoding_and_probes_again():
    a = AdaptiveK(8, 0.1, prior=0.6, prior_weight=2.0, probe_after=3)
    assert a.next_k() > 0
    for _ in range(12):                          # every draft rejected: alpha falls, k with it, down to 0
        a.update(max(1, a.k), 0)
    assert a.k == 0 and a.alpha < 0.05
    assert [a.next_k() for _ in range(3)] == [0, 0, 0]    # plain decoding for probe_after steps
    assert a.next_k() == 1                                 # then a probe
    for _ in range(12):                          # the text turned repetitive: every draft accepted
        a.update(max(1, a.k), max(1, a.k))
    assert a.k == 8 and a.alpha > 0.9
    with pytest.raises(ValueError, match="cost"):
        AdaptiveK(4, -1.0)


def test_step_costs_give_the_prior_until_measured_then_the_measured_ratio():
    c = StepCosts(0.1, decay=0.5, warmup=2, min_samples=3)
    assert c.ratio(1) == 1.0 and c.ratio(5) == pytest.approx(1.4)            # the prior: 1 + 0.1 * (T - 1)
    for _ in range(2):                                                       # warm-up samples (captures): skipped
        c.record_decode(4, 100.0)
        c.record_verify(4, 5, 100.0)
    for _ in range(2):
        c.record_decode(4, 1.0)
        c.record_verify(4, 5, 2.0)
    assert not c.measured(5) and c.ratio(5) == pytest.approx(1.4)            # 2 of 3 samples: still the prior
    c.record_decode(4, 1.0)
    c.record_verify(4, 5, 2.0)
    assert c.measured(5) and c.ratio(5) == pytest.approx(2.0)                # verify 2 s / decode 1 s
    assert c.ratio(3) == pytest.approx(1.2)                                  # T = 3 never ran: the prior
    c.record_verify(4, 5, 1000.0)                                            # a stall: clipped to 4x the average
    assert c.ratio(5) == pytest.approx(0.5 * 2.0 + 0.5 * 8.0)
    assert c.ratio(5, bucket=8) == pytest.approx(1.4)                        # another bucket: not measured
    c.record_decode(4, 10.0)
    assert c.ratio(5) >= 1.0                                                 # never below a decode step
    with pytest.raises(ValueError, match="cost"):
        StepCosts(-0.1)


def test_adaptive_k_with_a_fixed_verify_overhead_drafts_only_when_acceptance_pays_for_it():
    # A host-bound small model: a verify step costs 1.7 decode steps whatever k. Acceptance 0.25 cannot pay
    # for that (the linear prior of 0.03 per draft would draft); acceptance 0.9 drafts the most.
    fixed = lambda k: 1.7  # noqa: E731
    assert AdaptiveK(8, 0.03, prior=0.25, prior_weight=1e9).k > 0
    assert AdaptiveK(8, 0.03, prior=0.25, prior_weight=1e9, cost=fixed).k == 0
    assert AdaptiveK(8, 0.03, prior=0.9, prior_weight=1e9, cost=fixed).k == 8
    a = AdaptiveK(8, 0.03, prior=0.25, prior_weight=1e9, cost=lambda k: 100.0)
    assert [a.next_k() for _ in range(40)] == [0] * 40                       # drafts can never pay: no probes


# ------------------------------------------------------------------------------------------------ acceptance
def test_greedy_acceptance_takes_the_longest_matching_prefix_then_the_targets_token():
    V = 10
    best = [3, 5, 7, 2]
    logits = torch.full((4, V), -1.0)
    logits[torch.arange(4), torch.tensor(best)] = 1.0
    assert accept_drafts(logits, [3, 5, 7], SamplingParams()) == ([3, 5, 7, 2], 3)
    assert accept_drafts(logits, [3, 4, 7], SamplingParams()) == ([3, 5], 1)
    assert accept_drafts(logits, [9, 5, 7], SamplingParams()) == ([3], 0)


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def _tv_bound(p: torch.Tensor, n: int) -> float:
    """4 standard deviations of the summed absolute deviations (each |p_hat - p| has sd sqrt(p(1-p)/n))."""
    return 0.5 * 4 * float(torch.sqrt(p * (1 - p) / n).sum())


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(with_q):
    V, k, N = 5, 2, 4000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(k + 1, V, generator=g) * 1.5
    params = SamplingParams(temperature=0.8, top_k=4, seed=0)
    p = sampling_probs(logits, params)
    assert p.eq(0).sum(dim=1).eq(1).all()                   # top_k = 4 of 5 applied to p
    q = torch.softmax(torch.randn(k, V, generator=g), dim=-1) if with_q else None
    gen = torch.Generator().manual_seed(1)
    fixed = p[:k].argmax(dim=-1).tolist()
    first = torch.zeros(V)
    second = torch.zeros(V)           # the second token, given the first draft was accepted
    for _ in range(N):
        if q is None:
            drafts = fixed            # deterministic drafts (point masses): each position's likeliest token
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        toks, a = accept_drafts(logits, drafts, params, gen, q)
        assert toks[:a] == drafts[:a] and len(toks) == a + 1
        first[toks[0]] += 1
        if a >= 1:
            second[toks[1]] += 1
    assert _tv(first, p[0]) < _tv_bound(p[0], N)
    assert second.sum() > N / 10
    assert _tv(second, p[1]) < _tv_bound(p[1], int(second.sum()))
    # The bound is tight enough to catch a wrong scheme: always accepting gives the point mass, far from p.
    wrong = torch.zeros(V)
    wrong[int(p[0].argmax())] = N
    assert _tv(wrong, p[0]) > 3 * _tv_bound(p[0], N)


# ------------------------------------------------------------------------------------------------ rollback
def _compare_rows(a: StaticCache, ra: int, b: StaticCache, rb: int, atol: float = 1e-4) -> None:
    """Row ra of cache a holds what row rb of cache b holds: lengths, lightning states, K/V and K1/K2."""
    n = a.lengths[ra]
    assert n == b.lengths[rb] and int(a.seqlens[ra]) == int(b.seqlens[rb]) == n
    torch.testing.assert_close(a.states[:, ra], b.states[:, rb], atol=atol, rtol=1e-4)
    n1, n2 = _n12(n)
    for layer in a.sparse:
        x, y = a.sparse[layer], b.sparse[layer]
        torch.testing.assert_close(x.k[ra, :n], y.k[rb, :n], atol=atol, rtol=1e-4)
        torch.testing.assert_close(x.v[ra, :n], y.v[rb, :n], atol=atol, rtol=1e-4)
        torch.testing.assert_close(x.k1[ra, :n1], y.k1[rb, :n1], atol=atol, rtol=1e-4)
        torch.testing.assert_close(x.k2[ra, :n2], y.k2[rb, :n2], atol=atol, rtol=1e-4)


def _n12(n: int) -> tuple[int, int]:
    from sala.modeling.modeling_sala import sparse_params_from_config

    return compressed_lengths(n, sparse_params_from_config(CFG))


def _decode_rows(runner: ModelRunner, cache: StaticCache, ids: list[list[int]]) -> torch.Tensor:
    """Feed ids[r] to row r of the cache, one decode step per position (all rows step together); the last step's
    logits [B, V]."""
    step = DecodeStep(runner, cache)
    logits = None
    for col in zip(*ids):
        step.ids.copy_(torch.tensor(col))
        logits = step().clone()
        for r in range(cache.batch):
            cache.lengths[r] += 1
    return logits


def _verify(runner: ModelRunner, cache: StaticCache, ids: list[list[int]], keep: list[int],
            rollback: bool = True) -> torch.Tensor:
    """One verify step of ids [B][T] over the cache, then every row kept to its first keep[r] tokens."""
    step = VerifyStep(runner, cache, len(ids[0]))
    step.ids.copy_(torch.tensor(ids))
    logits = step().clone()
    assert [int(x) for x in cache.seqlens] == [n + len(ids[0]) for n in cache.lengths]
    if rollback:
        step.keep.copy_(torch.tensor(keep))
        step.rollback()
    for r, k in enumerate(keep):
        cache.lengths[r] += k
    cache.seqlens.copy_(torch.tensor(cache.lengths, dtype=torch.int32))
    return logits


@pytest.mark.parametrize("start,drafts,accepted", [
    (125, 7, 2),     # rejected tokens complete the K1 window ending at 132 and cross the dense length 128
    (109, 8, 0),     # the K2 window ending at 112 (32 every 16) completed by a rejected token; nothing accepted
    (140, 6, 5),     # sparse already; one rejection at the end
])
def test_rollback_equals_plain_decoding_of_the_accepted_tokens(model, start, drafts, accepted):
    # Three rows verify together: row 0 keeps 1 + accepted tokens, row 1 (other prompt, other length) keeps all
    # of its T tokens but one, row 2 is mid-prefill (takes no part: keeps 0, its states and K/V must survive).
    runner = ModelRunner(model)
    T = drafts + 1
    g = torch.Generator().manual_seed(start)
    prompts = [_repetitive(start, 5), _repetitive(start + 9, 6), _repetitive(start - 30, 7)]
    keep = [1 + accepted, T - 1, 0]
    tails = [torch.randint(3, CFG.vocab_size, (T,), generator=g).tolist() for _ in prompts]
    spec = StaticCache(CFG, 3, 320, torch.float32, "cpu")
    refs = [StaticCache(CFG, 1, 320, torch.float32, "cpu") for _ in prompts]
    for r, p in enumerate(prompts):
        runner.prefill_chunk(torch.tensor(p), spec, r)
        runner.prefill_chunk(torch.tensor(p), refs[r], 0)
    spec.seqlens.copy_(torch.tensor(spec.lengths, dtype=torch.int32))
    logits = _verify(runner, spec, tails, keep)
    assert logits.shape == (3, T, CFG.vocab_size)
    for r in range(3):
        ref_logits = _decode_rows(runner, refs[r], [tails[r][:keep[r]]]) if keep[r] else None
        _compare_rows(spec, r, refs[r], 0)
        if ref_logits is not None:   # the verify step's logits at the last kept position: plain decoding's
            torch.testing.assert_close(logits[r, keep[r] - 1], ref_logits[0], atol=1e-3, rtol=1e-3)
    # All go on decoding the same tokens (through the windows the rejected tokens had completed) identically.
    more = [torch.randint(3, CFG.vocab_size, (12,), generator=g).tolist() for _ in prompts]
    a = _decode_rows(runner, spec, more)
    for r in range(3):
        b = _decode_rows(runner, refs[r], [more[r]])
        _compare_rows(spec, r, refs[r], 0)
        torch.testing.assert_close(a[r], b[0], atol=1e-3, rtol=1e-3)


def test_without_restoring_the_states_rollback_would_be_wrong(model):
    # Guards the test above: truncating the lengths alone leaves the rejected tokens in the lightning states.
    runner = ModelRunner(model)
    prompt = _repetitive(60, 2)
    spec = StaticCache(CFG, 1, 128, torch.float32, "cpu")
    ref = StaticCache(CFG, 1, 128, torch.float32, "cpu")
    for c in (spec, ref):
        runner.prefill_chunk(torch.tensor(prompt), c, 0)
    _verify(runner, spec, [[5, 6, 7, 8]], [1], rollback=False)
    _decode_rows(runner, ref, [[5]])
    with pytest.raises(AssertionError):
        _compare_rows(spec, 0, ref, 0)


def test_a_verify_row_at_the_end_of_its_capacity_leaves_its_cached_tokens_alone(model):
    # A row whose padded verify positions run past the capacity: the clamped writes land beyond its length.
    runner = ModelRunner(model)
    spec = StaticCache(CFG, 1, 128, torch.float32, "cpu")
    ref = StaticCache(CFG, 1, 128, torch.float32, "cpu")
    prompt = _repetitive(125, 3)
    for c in (spec, ref):
        runner.prefill_chunk(torch.tensor(prompt), c, 0)
    logits = _verify(runner, spec, [[9, 10, 11, 12, 13, 14]], [2])       # positions 125..130 of a 128 capacity
    ref_logits = _decode_rows(runner, ref, [[9, 10]])
    _compare_rows(spec, 0, ref, 0)
    torch.testing.assert_close(logits[0, 1], ref_logits[0], atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ engine
def _run(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, dict]:
    for i, p in enumerate(prompts):
        core.add_request(Request(str(i), p, params))
    toks: dict[str, list[int]] = {}
    last: dict = {}
    for _ in range(10_000):
        if not core.has_unfinished():
            break
        for o in core.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            last[o.request_id] = o
    assert not core.has_unfinished()
    return toks, last


def _core(model, **kw) -> EngineCore:
    return EngineCore(model, None, max_num_seqs=4, max_model_len=256, chunk_size=64, enable_prefix_cache=False,
                      use_cuda_graph=False, **kw)


# Prompts of 100..120 tokens and 40 new: decoding crosses the dense length (128), K1 windows every 4 and K2
# windows every 16 tokens, and the pages of 16 tokens.
PROMPTS = [_repetitive(100, 11), _repetitive(117, 12), [1] + list(range(40, 150)), _repetitive(120, 14)]
NEW = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(model):
    return _run(_core(model), PROMPTS, NEW)[0]


def test_ngram_speculation_gives_the_plain_greedy_tokens_batched(model, plain):
    core = _core(model, speculative="ngram", num_speculative_tokens=6)
    toks, last = _run(core, PROMPTS, NEW)
    assert toks == plain
    st = core.stats()
    assert st["spec_verify_steps"] > 0 and st["spec_accepted_tokens_total"] > 0
    assert st["spec_draft_tokens_total"] == sum(o.speculative["draft_tokens"] for o in last.values())
    for o in last.values():
        s = o.speculative
        assert 0.0 <= s["acceptance_rate"] <= 1.0
        assert s["verify_steps"] == 0 or 1.0 <= s["mean_accepted_length"] <= 7.0
    # Copy-heavy prompts: drafts save decode steps (fewer model calls than tokens).
    assert st["decode_steps"] + st["spec_verify_steps"] < sum(len(t) for t in plain.values()) // 2 + 40


def test_no_verify_steps_where_drafts_cannot_pay_for_their_cost(model, plain):
    core = _core(model, speculative="ngram", num_speculative_tokens=6, speculative_cost_per_token=10.0)
    assert _run(core, PROMPTS, NEW)[0] == plain
    assert core.stats()["spec_verify_steps"] == 0


def test_measured_step_costs_steer_unseeded_requests_and_seeded_ones_keep_the_prior(model, plain):
    # Greedy requests take the engine's measured verify cost: made prohibitive here, they never verify (and still
    # give the plain tokens). A seeded sampling request keeps the prior cost (its k must not depend on timings).
    core = _core(model, speculative="ngram", num_speculative_tokens=6)
    core.step_costs.ratio = lambda tokens, bucket=None: 100.0
    assert _run(core, PROMPTS, NEW)[0] == plain
    assert core.stats()["spec_verify_steps"] == 0
    seeded = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8, seed=3)
    _run(core, PROMPTS[:1], seeded)
    assert core.stats()["spec_verify_steps"] > 0


def test_the_engine_measures_its_decode_and_verify_steps(model, plain):
    core = _core(model, speculative="ngram", num_speculative_tokens=4)
    assert _run(core, PROMPTS, NEW)[0] == plain
    n = core.step_costs._n                      # one sample per decode or verify step (each advances once)
    verify = sum(v for k, v in n.items() if k[0] == "verify")
    assert sum(n.values()) == core.stats()["decode_steps"] and verify > 0
    assert verify <= core.stats()["spec_verify_steps"]         # (that counter is per request and verify step)
    assert all(t in core.verify_sizes for k in n if k[0] == "verify" for t in k[2:])


def test_ngram_speculation_alone_equals_batched(model, plain):
    for i in (1, 2):
        toks, _ = _run(_core(model, speculative="ngram", num_speculative_tokens=4), [PROMPTS[i]], NEW)
        assert toks["0"] == plain[str(i)]


def test_draft_model_speculation_gives_the_plain_greedy_tokens(model, other_model, plain):
    # The target as its own draft (every draft accepted) and another model's drafts (mostly rejected).
    # The draft model recomputes the whole context per draft token: one prompt, 16 tokens (past 128).
    for draft, expect_all in ((model, True), (other_model, False)):
        core = _core(model, speculative="ngram", num_speculative_tokens=3)
        core.drafter = ModelDrafter(draft)
        toks, _last = _run(core, PROMPTS[3:], SamplingParams(max_new_tokens=16, ignore_eos=True))
        assert toks["0"] == plain["3"][:16]
        rate = core.stats()["spec_accepted_tokens_total"] / core.stats()["spec_draft_tokens_total"]
        assert (rate == 1.0) if expect_all else (rate < 1.0)


def test_draft_model_from_a_directory(model, tmp_path, plain):
    model.save_pretrained(tmp_path / "draft")
    core = _core(model, speculative=f"draft:{tmp_path / 'draft'}", num_speculative_tokens=2)
    assert isinstance(core.drafter, ModelDrafter)
    toks, _ = _run(core, PROMPTS[:1], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert toks["0"] == plain["0"][:6]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        _core(model, speculative=f"draft:{tmp_path / 'missing'}")


def test_sampling_with_speculation_is_seeded_and_stops_at_max_tokens(model):
    params = SamplingParams(max_new_tokens=30, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)
    a, la = _run(_core(model, speculative="ngram", num_speculative_tokens=4), PROMPTS[:2], params)
    b, _ = _run(_core(model, speculative="ngram", num_speculative_tokens=4), PROMPTS[:2], params)
    assert a == b and all(len(t) == 30 for t in a.values())
    assert all(o.num_output_tokens == 30 and o.finish_reason == "length" for o in la.values())


def test_logprobs_with_speculation_equal_plain(model):
    req = {"params": SamplingParams(max_new_tokens=20, ignore_eos=True), "logprobs": 2}

    def run(core):
        core.add_request(Request("x", PROMPTS[0], **req))
        return [lp for o in core.run_until_done() for lp in (o.new_logprobs or [])]

    a = run(_core(model))
    b = run(_core(model, speculative="ngram"))
    assert [x.token_id for x in a] == [x.token_id for x in b] and len(a) == 20
    assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-3) for x, y in zip(a, b))


def test_no_verify_steps_above_the_speculative_batch_limit(model, plain):
    # A limit of 1: verify steps only while one request decodes; 0: never.
    for limit in (1, 0):
        core = _core(model, speculative="ngram", speculative_max_batch=limit)
        toks, _ = _run(core, PROMPTS[:2], SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert toks == {k: plain[k][:8] for k in ("0", "1")}
        if limit == 0:
            assert core.stats()["spec_verify_steps"] == 0


def test_text_stop_strings_and_stop_tokens_with_speculation_equal_plain():
    # With a tokenizer: a verify step's accepted tokens are taken at once (detokenized together) unless stop
    # strings need every token's text; text, tokens and finish reasons equal plain decoding's either way.
    from sala.engine import SalaEngine
    from sala.utils.bundled import bundled_model_dir

    if bundled_model_dir() is None:
        pytest.skip("no bundled model in this installation")
    eng = SalaEngine.from_pretrained(bundled_model_dir(), device="cpu", dtype="fp32")
    ids = eng.tokenizer.encode("A list of the colors: red, green, blue, red, green, blue, red, green, blue, red, "
                               "green, blue, red, green, blue, red, green,", add_bos=True)

    def run(spec: str | None, params: SamplingParams):
        core = EngineCore(eng.model, eng.tokenizer, max_num_seqs=2, max_model_len=512, enable_prefix_cache=False,
                          speculative=spec, num_speculative_tokens=6)
        core.add_request(Request("x", ids, params))
        outs = core.run_until_done()
        got = ([t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs), outs[-1].finish_reason)
        return got, core.stats()["spec_accepted_tokens_total"]

    free = SamplingParams(max_new_tokens=40, ignore_eos=True)
    (toks, text, reason), _ = run(None, free)
    spec, accepted = run("ngram", free)
    assert spec == (toks, text, "length") and reason == "length" and accepted > 0
    # a stop string that ends the output early, and a stop token that does
    assert len(text) > 30
    for params in (SamplingParams(max_new_tokens=40, ignore_eos=True, stop=[text[20:24]]),
                   SamplingParams(max_new_tokens=40, ignore_eos=True, stop_token_ids=[toks[25]])):
        plain, _ = run(None, params)
        assert plain[2] == "stop" and len(plain[0]) < 40
        assert run("ngram", params)[0] == plain
