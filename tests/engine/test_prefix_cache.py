"""Exact prefix caching: a restored prefix continues exactly like an uninterrupted prefill (K/V, K1/K2, lightning
states, hidden states), across the dense/sparse threshold, with K2 windows straddling the prefix end; restored
pages are shared with the cache, not copied; EngineCore answers the same with the cache on and off; LRU eviction,
reference counts and giving pool pages back."""
from __future__ import annotations

import pytest
import torch

from sala.engine.forward import ModelRunner
from sala.engine.kv_pages import KVPagePool
from sala.engine.prefix_cache import PrefixCache, page_keys
from sala.engine.requests import Request
from sala.engine.sampling import SamplingParams
from sala.engine.scheduler import EngineCore
from sala.engine.static_cache import StaticCache
from sala.modeling import SalaConfig, SalaForCausalLM
from sala.modeling.modeling_sala import sparse_params_from_config
from sala.ops.infllmv2 import compressed_lengths, gather_paged

# Sparse settings small enough that block selection runs at a few hundred tokens: dense below
# (topk + window / block) * block = 96 positions; K1 stride 6, K2 windows of 48 keys every 24, so the K2 window
# that starts one page before a restored prefix end runs past it. Pages are blocks: 24 tokens.
SPARSE = {"kernel_size": 12, "kernel_stride": 6, "block_size": 24, "topk": 2, "init_blocks": 1, "window_size": 48,
          "dense_len": 96}
PS = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-tiny", sparse_config=SPARSE)
    assert sparse_params_from_config(cfg).dense_positions == 96
    return SalaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def runner(model):
    return ModelRunner(model)


def paged(cfg, rows: int, capacity: int, pages: int | None = None) -> StaticCache:
    pool = KVPagePool(cfg, pages or rows * capacity // PS, torch.float32, "cpu")
    return StaticCache(cfg, rows, capacity, torch.float32, "cpu", pool=pool)


def doc(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def prefill(runner, cache, row, ids, chunk, start=0, pc: PrefixCache | None = None) -> list[torch.Tensor]:
    cache.grow_row(row, len(ids))
    hs, stored = [], start
    for a in range(start, len(ids), chunk):
        b = min(len(ids), a + chunk)
        hs.append(runner.prefill_chunk(torch.tensor(ids[a:b]), cache, row).clone())
        if pc is not None and b % pc.page_size == 0:
            stored = pc.store(ids, cache, row, b, stored)
    return hs


def assert_rows_equal(cache, r1, r2, n, params):
    assert cache.lengths[r1] == cache.lengths[r2] == n
    n1, n2 = compressed_lengths(n, params)
    for buf in cache.sparse.values():
        for t in (buf.k, buf.v):
            assert torch.equal(gather_paged(t, cache.block_table[r1], n), gather_paged(t, cache.block_table[r2], n))
        assert torch.equal(buf.k1[r1, :n1], buf.k1[r2, :n1]) and torch.equal(buf.k2[r1, :n2], buf.k2[r2, :n2])
    assert torch.equal(cache.states[:, r1], cache.states[:, r2])


@pytest.mark.parametrize("shared,expect", [(70, 48), (150, 144), (290, 288)])
def test_restored_prefix_continues_exactly(model, runner, shared, expect):
    cfg, p = model.config, sparse_params_from_config(model.config)
    first = doc(300, 1)
    second = first[:shared] + doc(340 - shared, 2)
    cache = paged(cfg, 3, 384)
    pc = PrefixCache(cfg, cache.pool, max_bytes=1 << 30)
    prefill(runner, cache, 0, first, 48, pc=pc)
    assert len(pc.pages) == 12 and len(pc.snapshots) == 6           # snapshots at 48, 96, ..., 288
    m = pc.lookup(second, len(second) - 1)
    assert m is not None and m.length == expect
    pc.restore(m, cache, 1)
    assert cache.row_pages[1] == cache.row_pages[0][:expect // PS]  # the same pages: shared, not copied
    assert all(cache.pool.refs[q] == 3 for q in cache.row_pages[1])  # row 0, the prefix cache, row 1
    hs_full = prefill(runner, cache, 2, second[:expect], 48)         # uninterrupted, in the same chunks
    assert_rows_equal(cache, 1, 2, expect, p)                        # K/V, K1/K2 windows inside [0, P), states
    hs_cached = prefill(runner, cache, 1, second, 48, start=expect)
    hs_full += prefill(runner, cache, 2, second, 48, start=expect)
    assert_rows_equal(cache, 1, 2, len(second), p)
    assert cache.row_pages[0][:expect // PS] == cache.row_pages[1][:expect // PS]   # the shared pages untouched
    n_skip = expect // 48
    for a, b in zip(hs_cached, hs_full[n_skip:]):
        assert torch.equal(a, b)
    # One-chunk prefill into a contiguous cache (other chunk boundaries): the same within floating-point tolerance.
    whole = StaticCache(cfg, 1, 384, torch.float32, "cpu")
    h = runner.prefill_chunk(torch.tensor(second), whole, 0)
    torch.testing.assert_close(runner.logits_of(hs_cached[-1][:, -1]), runner.logits_of(h[:, -1]), rtol=1e-4,
                               atol=1e-4)


def test_lookup_matches_whole_pages_only_and_leaves_a_token_to_compute(model, runner):
    cfg = model.config
    cache = paged(cfg, 1, 240)
    pc = PrefixCache(cfg, cache.pool, max_bytes=1 << 30)
    ids = doc(192, 3)
    prefill(runner, cache, 0, ids, 48, pc=pc)
    assert pc.lookup(ids, len(ids) - 1).length == 144               # an identical prompt still computes its end
    changed = list(ids)
    changed[100] = (changed[100] + 1) % 500                          # page 4 differs
    assert pc.lookup(changed, len(changed) - 1).length == 96
    assert pc.lookup([7] + ids, 100) is None
    assert page_keys(ids, PS)[:2] == page_keys(ids[:48], PS)
    with pytest.raises(ValueError, match="empty"):
        pc.restore(pc.lookup(ids, 100), cache, 0)                   # row 0 still maps its pages


def test_eviction_is_lru_and_spares_entries_in_use(model, runner):
    cfg = model.config
    cache = paged(cfg, 1, 240, pages=40)
    pc = PrefixCache(cfg, cache.pool, max_bytes=1 << 30)
    docs = [doc(48, 20 + i) for i in range(3)]                       # 2 pages and 1 snapshot each
    prefill(runner, cache, 0, docs[0], 48, pc=pc)
    per_prompt = pc.bytes
    pc.clear()
    cache.reset()
    assert cache.pool.num_free == 40 and not pc.pages
    pc.max_bytes = 2 * per_prompt
    for i in range(2):
        cache.reset()
        prefill(runner, cache, 0, docs[i], 48, pc=pc)
    assert pc.bytes == 2 * per_prompt
    m0 = pc.lookup(docs[0] + [1], 48)
    pc.acquire(m0)                                                   # docs[0] in use (and most recent)
    cache.reset()
    prefill(runner, cache, 0, docs[2], 48, pc=pc)                    # evicts docs[1]'s snapshot, the LRU
    assert pc.bytes <= pc.max_bytes
    assert pc.lookup(docs[0] + [1], 48).length == 48
    assert pc.lookup(docs[1] + [1], 48) is None
    assert pc.lookup(docs[2] + [1], 48).length == 48
    assert pc.stats()["prefix_cache_refs"] > 0
    # Pool pressure: everything not in use gives its pages back; docs[0] (pinned) keeps its 2 pages.
    cache.reset()
    assert not pc.reclaim(40) and cache.pool.num_free == 38
    assert pc.lookup(docs[0] + [1], 48).length == 48 and pc.lookup(docs[2] + [1], 48) is None
    pc.release(m0)
    assert pc.stats()["prefix_cache_refs"] == 0
    pc.clear()
    assert pc.bytes == 0 and not pc.pages and not pc.snapshots and cache.pool.num_free == 40


def test_pool_pressure_shortens_prefixes_from_their_ends(model, runner):
    """Giving pages back drops a chain's last pages (and the snapshots on them) first: what stays is a usable
    prefix from the start; pages a running row maps are never taken."""
    cfg = model.config
    cache = paged(cfg, 2, 240, pages=12)
    pc = PrefixCache(cfg, cache.pool, max_bytes=1 << 30)
    ids = doc(240, 31)                                               # 10 pages, snapshots every 2 pages
    prefill(runner, cache, 0, ids, 48, pc=pc)
    assert cache.pool.num_free == 2 and len(pc.snapshots) == 5
    assert not pc.reclaim(3)                                         # row 0 still maps every page
    cache.reset_row(0)
    assert pc.reclaim(5) and cache.pool.num_free == 5               # pages 10, 9, 8 went
    m = pc.lookup(ids, len(ids) - 1)
    assert m is not None and m.length == 144 and m.keys == page_keys(ids, PS)[:6]
    assert len(pc.pages) == 7 and len(pc.snapshots) == 3


@pytest.mark.parametrize("chunk,cached", [(64, [0, 288, 288]), (192, [0, 192, 288])])
def test_engine_answers_the_same_with_and_without_the_cache(model, chunk, cached):
    # Pages of 24 tokens: 64-token chunks end on page boundaries, every 48 tokens. The first prompt snapshots at
    # its chunk ends and at its last page boundary (312, past the 310-token document: that page holds question
    # tokens). With 192-token chunks the second prompt restores 192 tokens and ends a chunk where it leaves the
    # cached pages (288), so the third restores 288.
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
