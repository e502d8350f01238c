"""The block-grouped CPU sparse attention and selection (sala.ops.infllmv2.blockwise_reference) against the
references: same outputs and gradients as sparse_attention_masked_ref / sparse_attention_flat_ref, same pooled
scores as pooled_block_scores_ref, and the tie rule (lowest block index at the cut-off)."""
import pytest
import torch

from sala.ops.infllmv2 import blockwise_reference as bw
from sala.ops.infllmv2.params import SparseParams
from sala.ops.infllmv2.reference import (
    pooled_block_scores_ref,
    sparse_attention_flat_ref,
    sparse_attention_masked_ref,
)

D64 = torch.float64


def _flat(q, k, v, idx, q_offset, block_size, scale):
    """sparse_attention_flat_ref on [B, T, H, D] inputs."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    pos = (q_offset + torch.arange(Tq)).repeat(B)
    kbase = torch.arange(B).repeat_interleave(Tq) * Tk
    o = sparse_attention_flat_ref(q.reshape(B * Tq, Hq, D), k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D),
                                  idx.permute(0, 2, 1, 3).reshape(B * Tq, Hkv, -1), pos, kbase, block_size, scale)
    return o.reshape(B, Tq, Hq, D)


def _selection(B, Hkv, Tq, K, q_offset, block_size, gen, minus_one=0.3):
    """Random ascending selections with the own block in every row, -1 entries at random places and no repeats."""
    pos = q_offset + torch.arange(Tq)
    own = pos // block_size
    idx = torch.randint(0, int(own.max()) + 1, (B, Hkv, Tq, K), generator=gen)
    idx = torch.minimum(idx, own[:, None])                 # never after the own block (both references agree)
    idx[..., 0] = own
    idx = torch.where(torch.rand(idx.shape, generator=gen) < minus_one, -1, idx)
    idx[..., 0] = own
    srt = idx.sort(dim=-1).values
    repeat = torch.zeros_like(srt, dtype=torch.bool)
    repeat[..., 1:] = srt[..., 1:] == srt[..., :-1]
    return torch.where(repeat, -1, srt).to(torch.int32)


CASES = [  # B, Tq, q_offset, extra keys, Hq, Hkv, D, block, K
    (2, 37, 50, 5, 4, 2, 8, 16, 4),      # GQA, tail block, keys beyond the last query
    (1, 100, 0, 0, 2, 2, 16, 16, 3),     # from position 0, no GQA
    (3, 70, 13, 0, 6, 2, 8, 8, 5),       # B = 3, G = 3, odd offset
    (1, 129, 200, 7, 4, 1, 16, 32, 6),   # one KV head for four query heads
]


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_masked_and_flat_references(case):
    B, Tq, off, extra, Hq, Hkv, D, bs, K = case
    gen = torch.Generator().manual_seed(sum(case))
    Tk = off + Tq + extra
    q = torch.randn(B, Tq, Hq, D, dtype=D64, generator=gen, requires_grad=True)
    k = torch.randn(B, Tk, Hkv, D, dtype=D64, generator=gen, requires_grad=True)
    v = torch.randn(B, Tk, Hkv, D, dtype=D64, generator=gen, requires_grad=True)
    idx = _selection(B, Hkv, Tq, K, off, bs, gen)
    assert (idx < 0).any()
    scale = D ** -0.5
    out = bw.sparse_attention_blockwise_ref(q, k, v, idx, off, bs, scale)
    masked = sparse_attention_masked_ref(q, k, v, idx, off, bs, scale)
    torch.testing.assert_close(out, masked, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, _flat(q, k, v, idx, off, bs, scale), rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, dtype=D64, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(masked, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


def test_small_batches_give_the_same_result(monkeypatch):
    """Many query chunks and group batches (a tiny temporary budget) compute the same attention."""
    gen = torch.Generator().manual_seed(3)
    B, Tq, off, Hq, Hkv, D, bs, K = 2, 90, 40, 4, 2, 8, 16, 5
    q = torch.randn(B, Tq, Hq, D, dtype=D64, generator=gen)
    k = torch.randn(B, off + Tq, Hkv, D, dtype=D64, generator=gen)
    v = torch.randn(B, off + Tq, Hkv, D, dtype=D64, generator=gen)
    idx = _selection(B, Hkv, Tq, K, off, bs, gen)
    whole = bw.sparse_attention_blockwise_ref(q, k, v, idx, off, bs, 0.3)
    monkeypatch.setattr(bw, "_MAX_ELEMENTS", 200)
    torch.testing.assert_close(bw.sparse_attention_blockwise_ref(q, k, v, idx, off, bs, 0.3), whole,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, sparse_attention_masked_ref(q, k, v, idx, off, bs, 0.3), rtol=1e-10, atol=1e-10)


def test_repeats_empty_rows_and_invisible_cache_tail():
    """A block listed twice counts once, a row with nothing visible gives 0 (both as the masked reference), and NaN
    in the keys after the last query (an unwritten cache) never reaches the output; fp32 stays fp32."""
    gen = torch.Generator().manual_seed(5)
    B, Tq, off, Hq, Hkv, D, bs = 1, 20, 30, 2, 1, 8, 8
    q = torch.randn(B, Tq, Hq, D, generator=gen)
    k = torch.randn(B, off + Tq + 9, Hkv, D, generator=gen)
    v = torch.randn(B, off + Tq + 9, Hkv, D, generator=gen)
    k[:, off + Tq:] = float("nan")
    v[:, off + Tq:] = float("nan")
    own = (off + torch.arange(Tq)) // bs
    idx = torch.stack([own, own, torch.zeros_like(own)], dim=-1)[None, None].to(torch.int32).clone()
    idx[0, 0, 3] = -1                                      # row 3 selects nothing
    out = bw.sparse_attention_blockwise_ref(q, k, v, idx, off, bs, 0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out[0, 3], torch.zeros(Hq, D))
    torch.testing.assert_close(out, sparse_attention_masked_ref(q, k, v, idx, off, bs, 0.5), rtol=1e-5, atol=1e-6)


def test_topk_ties_go_to_the_lowest_block_index():
    inf = float("inf")
    pooled = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, -inf],       # cut-off tie among 2, 3, 4: keeps 2
                           [inf, 0.5, 0.5, inf, 0.5, 0.5],        # forced blocks and a four-way tie: keeps 1
                           [inf, -inf, -inf, -inf, -inf, -inf]])  # fewer finite scores than picks: -1 padded
    got = bw.topk_lowest_index(pooled, 3)
    assert got.tolist() == [[1, 2, 3], [0, 1, 3], [0, -1, -1]]
    assert got.dtype == torch.int32
    assert bw.topk_lowest_index(torch.tensor([[2.0, 1.0]]), 3).tolist() == [[0, 1, -1]]   # fewer blocks than picks


def _brute_topk(pooled, total):
    """Stable sort by score: ties in index order."""
    order = torch.sort(pooled, dim=-1, descending=True, stable=True)
    keep = order.indices[..., :total]
    keep = torch.where(order.values[..., :total] > float("-inf"), keep, -1)
    srt = torch.where(keep < 0, pooled.shape[-1] + 1, keep).sort(dim=-1).values
    return torch.where(srt > pooled.shape[-1], -1, srt).to(torch.int32)


@pytest.mark.parametrize("B,Tq,q_offset,Hq,Hkv", [(1, 300, 0, 2, 1), (2, 150, 333, 4, 2), (1, 97, 1000, 6, 2)])
def test_selection_matches_the_reference_scores(B, Tq, q_offset, Hq, Hkv):
    """pooled_block_scores_blockwise gives pooled_block_scores_ref's scores; select_blocks_blockwise picks their
    top-k with the lowest index winning ties (adjacent blocks share a K1 window, so exact ties occur)."""
    params = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=4, init_blocks=1, window_size=32)
    gen = torch.Generator().manual_seed(B * Tq + q_offset)
    D = 8
    Tk = q_offset + Tq
    q = torch.randn(B, Tq, Hq, D, dtype=D64, generator=gen)
    k = torch.randn(B, Tk, Hkv, D, dtype=D64, generator=gen)
    from sala.ops.infllmv2.reference import compress_keys_ref
    k1 = compress_keys_ref(k, params.kernel_size, params.kernel_stride)
    k2 = compress_keys_ref(k, params.k2_kernel, params.k2_stride)
    pos = (q_offset + torch.arange(Tq))[None].expand(B, Tq)
    n_blocks = (Tk - 1) // params.block_size + 1
    want = pooled_block_scores_ref(q, k1, k2, pos, params, 0.35, n_blocks)
    got = bw.pooled_block_scores_blockwise(q, k1, k2, pos, params, 0.35, n_blocks)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got > 0, want > 0)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-14)
    ties = (want[..., 1:] == want[..., :-1]) & finite[..., 1:] & (want[..., 1:] > 0)
    assert ties.any()
    idx = bw.select_blocks_blockwise(q, k1, k2, pos, params, 0.35)
    assert torch.equal(idx, _brute_topk(want, params.total_blocks))


def test_cpu_dispatch_uses_the_block_grouped_paths(monkeypatch):
    """On the CPU, block_sparse_attention above the masked reference's limit runs sparse_attention_blockwise_ref (same
    result as the masked reference), and select_blocks gives the reference scores' top-k, ties to the lowest index."""
    from sala.ops.infllmv2 import select_blocks, sparse_attention
    from sala.ops.infllmv2.reference import compress_keys_ref

    params = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=4, init_blocks=1, window_size=32)
    gen = torch.Generator().manual_seed(9)
    B, Tq, off, Hq, Hkv, D = 1, 80, 100, 4, 2, 8
    q = torch.randn(B, Tq, Hq, D, dtype=D64, generator=gen)
    k = torch.randn(B, off + Tq, Hkv, D, dtype=D64, generator=gen)
    v = torch.randn(B, off + Tq, Hkv, D, dtype=D64, generator=gen)
    k1 = compress_keys_ref(k, params.kernel_size, params.kernel_stride)
    k2 = compress_keys_ref(k, params.k2_kernel, params.k2_stride)
    idx = select_blocks(q, k1, k2, params, q_offset=off, scale=0.35)
    pos = (off + torch.arange(Tq))[None]
    n_blocks = (off + Tq - 1) // params.block_size + 1
    assert torch.equal(idx, _brute_topk(pooled_block_scores_ref(q, k1, k2, pos, params, 0.35, n_blocks),
                                        params.total_blocks))
    calls = []
    real = sparse_attention.sparse_attention_blockwise_ref
    monkeypatch.setattr(sparse_attention, "sparse_attention_blockwise_ref",
                        lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(sparse_attention, "_MASKED_REF_MAX_ELEMENTS", 0)
    out = sparse_attention.block_sparse_attention(q, k, v, idx, params, q_offset=off, scale=0.35)
    assert calls == [1]
    torch.testing.assert_close(out, sparse_attention_masked_ref(q, k, v, idx, off, params.block_size, 0.35),
                               rtol=1e-10, atol=1e-10)
