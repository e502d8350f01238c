"""The piecewise prefill (`sala.engine.prefill_graph`): the dense pieces between the sparse layers' attention ops
give exactly the plain prefill's hidden states and cache (lightning states of the right row, sparse K/V and
compressed keys), chunk after chunk, for several rows, across the dense/sparse threshold; on a CUDA GPU the same
with the pieces replayed from CUDA graphs."""
from __future__ import annotations

import pytest
import torch

from sala.engine.forward import ModelRunner
from sala.engine.loading import random_model
from sala.engine.memory import prefill_graph_bytes
from sala.engine.prefill_graph import PiecewisePrefill
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig


def _runner(device: str = "cpu", dtype: torch.dtype = torch.float32, **kw) -> ModelRunner:
    cfg = SalaConfig.from_preset("sala-tiny", num_hidden_layers=5,
                                 mixer_types=["minicpm4", "lightning-attn", "minicpm4", "lightning-attn", "minicpm4"])
    return ModelRunner(random_model(cfg, torch.device(device), dtype, 0), **kw)


def _assert_same_cache(a: StaticCache, b: StaticCache) -> None:
    assert a.lengths == b.lengths and torch.equal(a.seqlens, b.seqlens)
    assert torch.equal(a.states, b.states)
    for layer in a.sparse:
        for name in ("k", "v", "k1", "k2"):
            assert torch.equal(getattr(a.sparse[layer], name), getattr(b.sparse[layer], name)), (layer, name)


def _chunk(pieces: PiecewisePrefill, ids: torch.Tensor, cache: StaticCache, row: int) -> torch.Tensor:
    """What ModelRunner.prefill_chunk does around the pieces."""
    start = cache.lengths[row]
    h = pieces(ids, cache, row, start)
    cache.lengths[row] = start + ids.shape[0]
    cache.seqlens[row:row + 1].fill_(start + ids.shape[0])
    return h.clone()


def _compare(runner: ModelRunner, pieces: PiecewisePrefill, chunk: int, rounds: int, rows=(2, 0)) -> None:
    cfg, dev = runner.config, runner.device
    piece_cache = StaticCache(cfg, 3, chunk * rounds, runner.dtype, dev)
    plain_cache = StaticCache(cfg, 3, chunk * rounds, runner.dtype, dev)
    g = torch.Generator().manual_seed(0)
    ids = {row: torch.randint(3, cfg.vocab_size, (chunk * rounds,), generator=g).to(dev) for row in rows}
    for i in range(rounds):               # rows interleaved: the row index reaches the lightning states
        for row in rows:
            part = ids[row][i * chunk:(i + 1) * chunk]
            got = _chunk(pieces, part, piece_cache, row)
            want = runner.prefill_chunk(part, plain_cache, row)
            assert torch.equal(got, want), (i, row, (got - want).abs().max())
            _assert_same_cache(piece_cache, plain_cache)
    assert piece_cache.lengths == [chunk * rounds if r in rows else 0 for r in range(3)]
    # the middle row was never written
    assert not piece_cache.states[:, 1].any() and not piece_cache.sparse[0].k[1].any()


def test_pieces_equal_plain_prefill_cpu():
    runner = _runner()
    pieces = PiecewisePrefill(runner, 48)
    assert pieces.num_pieces == 4 and pieces.mode == "eager"
    # 48-token chunks: the first two below sala-tiny's sparse regime (96 tokens), the rest above it
    _compare(runner, pieces, 48, 5)


def test_pieces_equal_plain_prefill_paged_cpu():
    """The serving engine's caches are paged: the pieces (and their eager sparse attention, reading K/V through
    the block table) give the hidden states, states, K/V and compressed keys of the plain prefill into a contiguous
    cache, whatever pages the rows were given."""
    from sala.engine.kv_pages import KVPagePool
    from sala.ops.infllmv2 import gather_paged

    runner = _runner()
    cfg, chunk, rounds = runner.config, 48, 4
    pool = KVPagePool(cfg, 40, runner.dtype, "cpu")
    held = pool.allocate(7)                                   # the rows' pages start elsewhere than page 1
    paged = StaticCache(cfg, 2, chunk * rounds, runner.dtype, "cpu", pool=pool)
    plain = StaticCache(cfg, 2, chunk * rounds, runner.dtype, "cpu")
    pool.release(held[::2])
    for row in (1, 0):
        paged.grow_row(row, chunk * rounds)
    assert paged.row_pages[1] != sorted(paged.row_pages[1])             # pages out of order (7, 5, 3, 1, ...)
    pieces = PiecewisePrefill(runner, chunk)
    ids = torch.randint(3, cfg.vocab_size, (2, chunk * rounds), generator=torch.Generator().manual_seed(1))
    for i in range(rounds):
        for row in (1, 0):
            part = ids[row, i * chunk:(i + 1) * chunk]
            got = _chunk(pieces, part, paged, row)
            want = runner.prefill_chunk(part, plain, row)
            assert torch.equal(got, want), (i, row)
    n = chunk * rounds
    assert paged.lengths == plain.lengths == [n, n] and torch.equal(paged.states, plain.states)
    for layer in plain.sparse:
        a, b = paged.sparse[layer], plain.sparse[layer]
        for row in (0, 1):
            assert torch.equal(gather_paged(a.k, paged.block_table[row], n)[0], b.k[row, :n])
            assert torch.equal(gather_paged(a.v, paged.block_table[row], n)[0], b.v[row, :n])
        assert torch.equal(a.k1, b.k1) and torch.equal(a.k2, b.k2)


def test_pieces_equal_plain_prefill_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SALA_KERNELS", "triton")
    runner = _runner()
    _compare(runner, PiecewisePrefill(runner, 32), 32, 2, rows=(2,))     # the Triton kernels: small and slow


def test_pieces_reject_wrong_length_and_runner_keeps_them_off_on_cpu():
    runner = _runner(prefill_graphs=4)
    assert runner.prefill_graphs == 0 and runner._pieces_for(64) is None     # CPU: the plain forward
    pieces = PiecewisePrefill(runner, 32)
    cache = StaticCache(runner.config, 1, 64, runner.dtype, runner.device)
    with pytest.raises(ValueError, match=r"shape \(32,\), got \(31,\)"):
        pieces(torch.zeros(31, dtype=torch.long), cache, 0, 0)
    with pytest.raises(ValueError, match="length must be >= 1"):
        PiecewisePrefill(runner, 0)
    with pytest.raises(ValueError, match="prefill_graphs"):
        _runner(prefill_graphs=-1)


def test_prefill_graph_memory_estimate_grows_with_lengths():
    cfg = SalaConfig.from_preset("minicpm-sala-9b")
    one = prefill_graph_bytes(cfg, 2048, 1, torch.bfloat16)
    four = prefill_graph_bytes(cfg, 2048, 4, torch.bfloat16)
    per_len = 2048 * (2 * cfg.hidden_size + 3 * cfg.num_attention_heads * cfg.head_dim
                      + 2 * cfg.num_key_value_heads * cfg.head_dim) * 2
    assert four - one == 3 * per_len and one > per_len
    assert prefill_graph_bytes(cfg, 2048, 0, torch.bfloat16) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_replayed_from_graphs_equal_plain_prefill_gpu(dtype):
    runner = _runner("cuda", dtype)
    pieces = PiecewisePrefill(runner, 64)
    _compare(runner, pieces, 64, 4)          # call 1 eager, call 2 captures, later calls replay
    assert pieces.mode == "cuda-graph" and pieces.graphs is not None and len(pieces.graphs) == 4


def test_runner_graphs_repeated_lengths_keeps_pinned_and_recent_ones():
    runner = _runner(prefill_graphs=2, prefill_graph_max_tokens=128)
    runner.prefill_graphs = 2                  # on the CPU the runner keeps them off; the policy is the same
    assert runner._pieces_for(256) is None
    assert runner._pieces_for(64) is None and runner._pieces_for(128) is None     # first sight: run plainly
    a, b = runner._pieces_for(64), runner._pieces_for(128)
    assert a is not None and b is not None and runner._pieces_for(64) is a
    assert runner._pieces_for(96) is None
    c = runner._pieces_for(96)                 # evicts 128, the least recently used
    assert list(runner._pieces) == [64, 96] and c is not b
    runner.pin_prefill_graphs([32])
    pinned = runner._pieces_for(32)            # pinned: graphed at once and never evicted
    assert pinned is not None and 32 in runner._pieces
    for n in (40, 40, 48, 48, 56, 56):
        runner._pieces_for(n)
    assert runner._pieces_for(32) is pinned and len(runner._pieces) == 2
    # through prefill_chunk: a chunk length's second sight runs the pieces (eagerly here), with the same result
    cache = StaticCache(runner.config, 1, 256, runner.dtype, runner.device)
    plain = StaticCache(runner.config, 1, 256, runner.dtype, runner.device)
    ids = torch.arange(3, 3 + 72) % runner.config.vocab_size
    for part in (ids[:24], ids[24:48], ids[48:72]):
        got = runner.prefill_chunk(part, cache, 0).clone()
        runner.prefill_graphs = 0
        want = runner.prefill_chunk(part, plain, 0)
        runner.prefill_graphs = 2
        assert torch.equal(got, want)
    assert 24 in runner._pieces and runner._pieces[24].mode == "eager"
    _assert_same_cache(cache, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_captures_serving_lengths_at_start_and_answers_alike_gpu():
    from sala.engine.requests import Request
    from sala.engine.sampling import SamplingParams
    from sala.engine.scheduler import EngineCore

    runner = _runner("cuda", torch.float32)
    core = EngineCore(runner.model, None, max_num_seqs=2, max_model_len=1024, chunk_size=128,
                      enable_prefix_cache=False)
    assert sorted(core.runner._pieces) == [64, 128]
    assert all(p.graphs is not None for p in core.runner._pieces.values())
    assert core.cache.lengths == [0, 0] and not core.cache.states.any()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, runner.config.vocab_size, (700,), generator=g).tolist()
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    core.add_request(Request("a", prompt, sp))
    graphed = [t for o in core.run_until_done() for t in o.new_token_ids]
    eager = EngineCore(runner.model, None, max_num_seqs=2, max_model_len=1024, chunk_size=128,
                       enable_prefix_cache=False, use_cuda_graph=False)
    eager.add_request(Request("a", prompt, sp))
    assert graphed == [t for o in eager.run_until_done() for t in o.new_token_ids]
