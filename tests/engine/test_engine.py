"""The inference engine (CPU): chunked prefill + decode equal the model's plain forward; batches equal single
runs; sampling filters and stop strings; memory plan numbers and refusals."""
from __future__ import annotations

import pytest
import torch

from sala.engine import SalaEngine, SamplingParams, StopMatcher, filter_top_k, filter_top_p, plan_memory
from sala.engine.memory import check_fits, largest_context, parameter_counts
from sala.engine.sampling import sample_next
from sala.modeling import SalaConfig, SalaForCausalLM


def tiny_model(seed: int = 0, **over) -> SalaForCausalLM:
    torch.manual_seed(seed)
    m = SalaForCausalLM(SalaConfig.from_preset("sala-tiny", **over)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


def model_logits(model: SalaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# sala-tiny selects blocks from position 64 on (topk 2 + 2 local blocks of 16), so 90 tokens cover both regimes.
PROMPT_LEN = 90


@pytest.mark.parametrize("chunk", [1 << 20, 37, 16])
def test_chunked_prefill_equals_plain_forward(chunk):
    model = tiny_model()
    ids = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = model_logits(model, ids)[-1]
    engine = SalaEngine(model, chunk_size=chunk)
    got = engine.prefill([ids], PROMPT_LEN + 4)[0]
    assert rel(got, ref) < 1e-5
    assert engine.cache.lengths == [PROMPT_LEN]


def test_engine_on_a_model_fused_for_training_re_fuses_its_mlp_and_keeps_the_logits():
    """A model whose projections were fused for training (gate/up rows interleaved) is re-fused by the runner into
    the [gate | up] halves that the fused SiLU x up op reads; the logits stay the model's."""
    model = tiny_model(seed=4)
    ids = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = model_logits(model, ids)[-1]
    model.fuse_projections(interleave_mlp=True)
    engine = SalaEngine(model, chunk_size=32)
    assert model.projections_fused and not any(layer.mlp.interleave for layer in model.model.layers)
    assert rel(engine.prefill([ids], PROMPT_LEN + 1)[0], ref) < 1e-5


def test_compiled_prefill_equals_plain_forward_with_one_graph_per_piece():
    """compile=True (backend "eager" here: dynamo tracing without code generation, fast on a CPU) gives the
    plain forward's logits, and every compiled piece is traced once for all layers and chunk lengths (no
    per-layer or per-length recompiles that would fall back to eager past dynamo's recompile limit)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_model(seed=3)
    ids = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = model_logits(model, ids)[-1]
    torch._dynamo.reset()
    counters.clear()
    engine = SalaEngine(model, chunk_size=23, compile=True, compile_backend="eager")   # chunks 23, 23, ..., tail
    assert engine.runner.compiled
    got = engine.prefill([ids], PROMPT_LEN + 4)[0]
    assert rel(got, ref) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    # at most one graph per distinct function (RMSNorm, lightning prepare + finish, sparse prepare + finish,
    # silu_mul, residual: 7); a graph per layer would give 13 or more for the 4 layers of sala-tiny
    assert 5 <= graphs <= 7, dict(counters["stats"])
    engine.prefill([ids[:31]], 40)                         # new lengths: no new graphs
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    torch._dynamo.reset()


def test_decode_logits_and_greedy_tokens_equal_plain_forward():
    model = tiny_model(seed=2)
    ids = torch.randint(3, 512, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    n_new = 24                                    # 50 -> 74 crosses into the sparse regime during decode
    engine = SalaEngine(model, chunk_size=19)
    seen: list[torch.Tensor] = []
    res = engine.generate([ids], SamplingParams(max_new_tokens=n_new, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == n_new
    # the model, recomputing everything each step, must agree on every logit vector and token
    seq = list(ids)
    for t in range(n_new):
        logits = model_logits(model, seq)[-1]
        seen.append(logits)
        assert int(logits.argmax()) == res.token_ids[t], f"token {t} differs"
        seq.append(res.token_ids[t])
    # and the decode path's own logits (one step at a time through DecodeStep) match too
    engine2 = SalaEngine(model, chunk_size=64)
    first = engine2.prefill([ids], len(ids) + n_new)
    assert rel(first[0], seen[0]) < 1e-5
    from sala.engine.forward import DecodeStep

    step = DecodeStep(engine2.runner, engine2.cache)
    for t in range(1, n_new):
        step.ids.fill_(res.token_ids[t - 1])
        got = step()[0]
        assert rel(got, seen[t]) < 1e-5, f"decode step {t}"


def test_batch_of_prompts_equals_individual_runs():
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (75, 9, 40)]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = SalaEngine(model, chunk_size=32).generate(prompts, sp)
    for p, r in zip(prompts, batch):
        single = SalaEngine(model, chunk_size=32).generate([p], sp)[0]
        assert r.token_ids == single.token_ids
        assert r.prompt_tokens == len(p)


def test_stop_token_ids_end_each_sequence():
    model = tiny_model(seed=4)
    ids = [5, 6, 7, 8, 9]
    free = SalaEngine(model).generate([ids], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].token_ids
    stop = free[3]
    first = free.index(stop)
    res = SalaEngine(model).generate([ids], SamplingParams(max_new_tokens=10, stop_token_ids=[stop],
                                                           ignore_eos=True))[0]
    assert res.finish_reason == "stop_token" and res.token_ids == free[:first]


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model(seed=5)
    ids = [11, 12, 13]
    sp = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=3, seed=7, ignore_eos=True)
    a = SalaEngine(model).generate([ids], sp)[0].token_ids
    b = SalaEngine(model).generate([ids], sp)[0].token_ids
    assert a == b
    # every sampled token is among the top 3 of the model's logits at its step
    seq = list(ids)
    for tok in a:
        top3 = model_logits(model, seq)[-1].topk(3).indices.tolist()
        assert tok in top3
        seq.append(tok)


# ----------------------------------------------------------------------------- sampling filters
def test_top_k_filter_by_hand():
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_top_k(x, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert filter_top_k(x, 0) is x


def test_top_p_filter_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    # mass before each token: 0, .5, .8, .95 -> p=0.6 keeps the first two (0.5 < 0.6 needs the second)
    assert torch.isfinite(filter_top_p(x, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(x, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_top_p(x, 0.81)).tolist() == [[True, True, True, False]]
    # order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(filter_top_p(x[:, perm], 0.6)).tolist() == [[False, True, False, True]]


def test_greedy_and_temperature_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample_next(logits, SamplingParams(temperature=0)).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g) for _ in range(20)])
    assert (draws == torch.tensor([1, 0])).all()


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("Hello") == ("Hello", False)
    assert m.feed("Hello E") == (" ", False)           # "E" may start "END": held back
    assert m.feed("Hello EN") == ("", False)
    assert m.feed("Hello ENx") == ("ENx", False)       # not a stop after all: released
    assert m.feed("Hello ENx\nEND tail") == ("\n", True)
    assert m.text == "Hello ENx\n" and m.stopped


def test_stop_matcher_without_stops_streams_everything():
    m = StopMatcher([])
    assert m.feed("ab") == ("ab", False)
    assert m.feed("abcd") == ("cd", False)
    assert m.flush("abcde") == "e"


# ----------------------------------------------------------------------------- memory plan
def test_memory_plan_9b_at_1m():
    cfg = SalaConfig.from_preset("minicpm-sala-9b")
    plan = plan_memory(cfg, 1 << 20, 1)
    assert plan.sparse_kv == 8 * 2 * 2 * 128 * 2 * (1 << 20)             # 8 GiB
    assert plan.weights == parameter_counts(cfg)["total"] * 2
    assert abs(plan.weights / 1e9 - 18.95) < 0.01
    n1, n2 = ((1 << 20) - 32) // 16 + 1, ((1 << 20) - 128) // 64 + 1
    assert plan.compressed_keys == 8 * (n1 + n2) * 2 * 128 * 2
    assert plan.lightning_states == 24 * 32 * 128 * 128 * 4
    assert plan.total == plan.weights + plan.sparse_kv + plan.compressed_keys + plan.lightning_states + plan.workspace
    assert plan.total < 32 * 2**30                                        # the consumer-GPU claim
    # KV scales with batch and context; the workspace grows with the chunk
    assert plan_memory(cfg, 1 << 19, 2).sparse_kv == plan.sparse_kv
    assert plan_memory(cfg, 1 << 20, 1, chunk_size=65536).workspace > plan.workspace


def test_parameter_counts_by_kind():
    counts = parameter_counts(SalaConfig.from_preset("minicpm-sala-9b"))
    assert counts["embeddings"] == 2 * 73448 * 4096
    assert counts["sparse_attention"] == 8 * (3 * 4096 * 4096 + 2 * 256 * 4096)
    assert counts["lightning_attention"] == 24 * (5 * 4096 * 4096 + 2 * 128 + 4096)
    assert counts["mlp"] == 32 * 3 * 4096 * 16384
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_refusal_names_the_numbers_and_the_largest_context():
    cfg = SalaConfig.from_preset("minicpm-sala-9b")
    plan = plan_memory(cfg, 2 << 20, 1)
    capacity = 24 * 2**30                                                 # a simulated 24 GiB card
    best = largest_context(cfg, capacity)
    assert 0 < best < 2 << 20
    assert plan_memory(cfg, best, 1).total <= capacity < plan_memory(cfg, best + 1024, 1).total
    with pytest.raises(MemoryError) as e:
        check_fits(cfg, plan, capacity, where="cuda:0")
    msg = str(e.value)
    assert "24.00 GiB" in msg and f"{best:,}" in msg and "sparse KV 16.00 GiB" in msg and "weights 17.65 GiB" in msg
    check_fits(cfg, plan_memory(cfg, best, 1), capacity)                  # the suggestion really fits


def test_engine_refuses_before_allocating(monkeypatch):
    import sala.engine.engine as eng

    model = tiny_model()
    engine = SalaEngine(model)
    monkeypatch.setattr(eng, "device_free_bytes", lambda device: 100 * 2**20)   # below the fixed allowance
    with pytest.raises(MemoryError, match="not enough memory"):
        engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))
    assert engine.cache is None
