"""Exact prefix caching: a restored prefix continues exactly like an uninterrupted prefill (K/V, K1/K2, lightning
states, hidden states), across the dense/sparse threshold and with a prefix length that is not a multiple of the
K1/K2 strides; EngineCore answers the same with the cache on and off; LRU eviction and reference counts."""
from __future__ import annotations

import pytest
import torch

from sala.engine.forward import ModelRunner
from sala.engine.prefix_cache import PrefixCache, page_keys
from sala.engine.requests import Request
from sala.engine.sampling import SamplingParams
from sala.engine.scheduler import EngineCore
from sala.engine.static_cache import StaticCache
from sala.modeling import SalaConfig, SalaForCausalLM
from sala.modeling.modeling_sala import sparse_params_from_config
from sala.ops.infllmv2 import compressed_lengths

# Sparse settings small enough that block selection runs at a few hundred tokens: dense below
# (topk + window / block) * block = 96 positions; K1 stride 6, K2 stride 24 (page boundaries 64, 128, 256 are not
# multiples of 24, so K2 windows straddle every restored prefix end).
SPARSE = {"kernel_size": 12, "kernel_stride": 6, "block_size": 24, "topk": 2, "init_blocks": 1, "window_size": 48,
          "dense_len": 96}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-tiny", sparse_config=SPARSE)
    assert sparse_params_from_config(cfg).dense_positions == 96
    return SalaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def runner(model):
    return ModelRunner(model)


def doc(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def prefill(runner, cache, row, ids, chunk, start=0, pc: PrefixCache | None = None) -> list[torch.Tensor]:
    hs, stored = [], start
    for a in range(start, len(ids), chunk):
        b = min(len(ids), a + chunk)
        hs.append(runner.prefill_chunk(torch.tensor(ids[a:b]), cache, row))
        if pc is not None and b % pc.page_size == 0:
            stored = pc.store(ids, cache, row, b, stored)
    return hs


def assert_rows_equal(cache, r1, r2, n, params):
    assert cache.lengths[r1] == cache.lengths[r2] == n
    n1, n2 = compressed_lengths(n, params)
    for buf in cache.sparse.values():
        assert torch.equal(buf.k[r1, :n], buf.k[r2, :n]) and torch.equal(buf.v[r1, :n], buf.v[r2, :n])
        assert torch.equal(buf.k1[r1, :n1], buf.k1[r2, :n1]) and torch.equal(buf.k2[r1, :n2], buf.k2[r2, :n2])
    assert torch.equal(cache.states[:, r1], cache.states[:, r2])


@pytest.mark.parametrize("shared,expect", [(70, 64), (150, 128), (290, 256)])
def test_restored_prefix_continues_exactly(model, runner, shared, expect):
    cfg, p = model.config, sparse_params_from_config(model.config)
    first = doc(300, 1)
    second = first[:shared] + doc(340 - shared, 2)
    pc = PrefixCache(cfg, max_bytes=1 << 30)
    cache = StaticCache(cfg, 3, 384, torch.float32, "cpu")
    prefill(runner, cache, 0, first, 64, pc=pc)
    assert len(pc.pages) == 4 and len(pc.snapshots) == 4            # pages and snapshots at 64, 128, 192, 256
    m = pc.lookup(second, len(second) - 1)
    assert m is not None and m.length == expect and expect % p.k2_stride != 0
    pc.restore(m, cache, 1)
    hs_full = prefill(runner, cache, 2, second[:expect], 64)         # uninterrupted, in the same chunks
    assert_rows_equal(cache, 1, 2, expect, p)                        # K/V, K1/K2 windows inside [0, P), states
    hs_cached = prefill(runner, cache, 1, second, 64, start=expect)
    hs_full += prefill(runner, cache, 2, second, 64, start=expect)
    assert_rows_equal(cache, 1, 2, len(second), p)
    n_skip = expect // 64
    for a, b in zip(hs_cached, hs_full[n_skip:]):
        assert torch.equal(a, b)
    # One-chunk prefill (other chunk boundaries): the same within floating-point tolerance.
    whole = StaticCache(cfg, 1, 384, torch.float32, "cpu")
    h = runner.prefill_chunk(torch.tensor(second), whole, 0)
    torch.testing.assert_close(runner.logits_of(hs_cached[-1][:, -1]), runner.logits_of(h[:, -1]), rtol=1e-4,
                               atol=1e-4)


def test_lookup_matches_whole_pages_only_and_leaves_a_token_to_compute(model, runner):
    cfg = model.config
    pc = PrefixCache(cfg, max_bytes=1 << 30)
    cache = StaticCache(cfg, 1, 256, torch.float32, "cpu")
    ids = doc(192, 3)
    prefill(runner, cache, 0, ids, 64, pc=pc)
    assert pc.lookup(ids, len(ids) - 1).length == 128                # an identical prompt still computes its end
    changed = list(ids)
    changed[100] = (changed[100] + 1) % 500                          # page 1 differs
    assert pc.lookup(changed, len(changed) - 1).length == 64
    assert pc.lookup([7] + ids, 100) is None
    assert page_keys(ids)[:2] == page_keys(ids[:128])


def test_eviction_is_lru_and_spares_entries_in_use(model, runner):
    cfg = model.config
    cache = StaticCache(cfg, 1, 256, torch.float32, "cpu")
    probe = PrefixCache(cfg, max_bytes=1 << 30)
    prefill(runner, cache, 0, doc(128, 10), 64, pc=probe)
    per_prompt = probe.bytes                                         # 2 pages + 2 snapshots
    pc = PrefixCache(cfg, max_bytes=2 * per_prompt)
    docs = [doc(128, 20 + i) for i in range(3)]
    for i in range(2):
        cache.reset()
        prefill(runner, cache, 0, docs[i], 64, pc=pc)
    assert pc.bytes == 2 * per_prompt
    m0 = pc.lookup(docs[0] + [1], 128)
    pc.acquire(m0)                                                   # docs[0] in use (and most recent)
    cache.reset()
    prefill(runner, cache, 0, docs[2], 64, pc=pc)                    # evicts docs[1], the least recently used
    assert pc.bytes <= pc.max_bytes
    assert pc.lookup(docs[0] + [1], 128).length == 128
    assert pc.lookup(docs[1] + [1], 128) is None
    assert pc.lookup(docs[2] + [1], 128).length == 128
    assert pc.stats()["prefix_cache_refs"] > 0
    pc.release(m0)
    assert pc.stats()["prefix_cache_refs"] == 0
    pc.clear()
    assert pc.bytes == 0 and not pc.pages and not pc.snapshots


@pytest.mark.parametrize("chunk,cached", [(64, [0, 256, 256]), (192, [0, 192, 256])])
def test_engine_answers_the_same_with_and_without_the_cache(model, chunk, cached):
    # The first prompt snapshots at its chunk ends and at its last page boundary (320, past the 310-token
    # document). With 192-token chunks the second prompt restores 192 tokens and ends a chunk where it leaves
    # the cached pages (256), so the third restores 256.
    document = doc(310, 4)
    questions = [doc(20, 5), doc(9, 6), doc(15, 7)]
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)

    def answers(enable: bool):
        core = EngineCore(model, None, max_num_seqs=2, max_model_len=384, chunk_size=chunk,
                          enable_prefix_cache=enable)
        got = []
        for i, q in enumerate(questions):                            # one after another: follow-ups
            core.add_request(Request(f"q{i}", document + q, sp, logprobs=2))
            outs = core.run_until_done()
            got.append(([t for o in outs for t in o.new_token_ids], [lp for o in outs for lp in o.new_logprobs],
                         outs[-1].num_cached_tokens))
        return got, core.stats()

    on, st_on = answers(True)
    off, st_off = answers(False)
    for (t1, lp1, c1), (t2, lp2, c2) in zip(on, off):
        assert t1 == t2
        for a, b in zip(lp1, lp2):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert c2 == 0
    assert [c for _, _, c in on] == cached
    assert st_on["prefix_cache_hits"] == sum(cached)
    assert st_on["prefix_cache_queries"] == sum(len(document) + len(q) for q in questions)
    assert st_on["prefill_tokens_total"] == st_off["prefill_tokens_total"] - sum(cached)
    assert st_on["prefix_cache_refs"] == 0 and st_on["free_slots"] == 2


def test_pressure_shortens_prefixes_from_their_ends(model, runner):
    """Under pressure old snapshots go first, and a prompt never evicts the prefix it is extending: what stays
    is a usable prefix from the start."""
    cfg = model.config
    cache = StaticCache(cfg, 1, 512, torch.float32, "cpu")
    probe = PrefixCache(cfg, max_bytes=1 << 30)
    prefill(runner, cache, 0, doc(128, 30), 64, pc=probe)
    page = probe.pages[page_keys(doc(128, 30))[0]].nbytes
    snap = next(iter(probe.snapshots.values())).nbytes
    pc = PrefixCache(cfg, max_bytes=5 * page + 2 * snap)         # room for 5 of the 7 pages and 2 snapshots
    ids = doc(448, 31)
    cache.reset()
    prefill(runner, cache, 0, ids, 64, pc=pc)
    assert pc.bytes <= pc.max_bytes and pc.evictions > 0
    m = pc.lookup(ids, len(ids) - 1)
    assert m is not None and m.length == 320                        # the 5 pages that fit, with a snapshot
    assert page_keys(ids)[:5] == m.keys
    assert len(pc.pages) == 5
