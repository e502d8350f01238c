"""Triton InfLLM-V2 kernels vs the PyTorch reference, tiny shapes, under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported) so CPU CI really runs the kernels: tests/ops/test_infllmv2_triton.py runs each check
in the pytest process itself when the session interprets its kernels (a CPU-only machine), else all in one subprocess.

`python tests/ops/infllmv2_triton_checks.py` prints one JSON line {check: "ok" | error text}.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback

import torch

from sala.ops.infllmv2 import (
    SparseKernelConfig,
    SparseParams,
    block_sparse_attention,
    compress_keys,
    compressed_lengths,
    infllmv2_attention,
    infllmv2_decode,
    select_blocks,
    update_compressed_keys,
)
from sala.ops.infllmv2 import reference as ref

SMALL = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)


def _mode(name: str) -> None:
    os.environ["SALA_KERNELS"] = name


def _qkv(B, T, Hkv, G, D, seed, Tq=None):
    g = torch.Generator().manual_seed(seed)
    Tq = T if Tq is None else Tq
    return (torch.randn(B, Tq, Hkv * G, D, generator=g), torch.randn(B, T, Hkv, D, generator=g),
            torch.randn(B, T, Hkv, D, generator=g))


def assert_same_selection(got, want, q, k1, k2, pos, p, scale, rel=1e-4):
    """Indices equal, except rows where the differing blocks' scores tie with the cut-off (fp32 rounding)."""
    if torch.equal(got, want):
        return
    pooled = ref.pooled_block_scores_ref(q.double(), k1.double(), k2.double(), pos, p, scale,
                                         int(pos.max()) // p.block_size + 1)
    bad = (got != want).any(-1).nonzero().tolist()
    for b, h, t in bad:
        row = pooled[b, h, t]
        a, w = set(got[b, h, t].tolist()) - {-1}, set(want[b, h, t].tolist()) - {-1}
        diff = [row[i] for i in a ^ w]
        cut = torch.sort(row[torch.isfinite(row)], descending=True).values
        thr = cut[min(len(cut) - 1, p.total_blocks - (row == float('inf')).sum().item() - 1)]
        assert all(abs(float(x) - float(thr)) <= rel * abs(float(thr)) + 1e-12 for x in diff), (b, h, t, a, w)
    assert len(bad) <= max(1, got.shape[2] // 20), f"{len(bad)} rows differ"


def check_compress():
    k = torch.randn(2, 70, 2, 16)
    for kernel, stride in ((8, 4), (32, 16)):
        torch.testing.assert_close(compress_keys(k, kernel, stride), ref.compress_keys_ref(k, kernel, stride))
    n1, n2 = compressed_lengths(70, SMALL)
    caches = [torch.full((2, n1, 2, 16), float("nan")), torch.full((2, n2, 2, 16), float("nan"))]
    lengths = torch.tensor([40, 52], dtype=torch.int32)
    update_compressed_keys(k, *caches, lengths, SMALL, new_tokens=52)
    lengths = lengths + 9
    update_compressed_keys(k, *caches, lengths, SMALL, new_tokens=9)
    for _ in range(3):              # one token a step: 52 and 64 complete K1 windows, 64 a K2 window of row 1 only
        lengths = lengths + 1
        update_compressed_keys(k, *caches, lengths, SMALL)
    for b in range(2):
        L = int(lengths[b])
        m1, m2 = compressed_lengths(L, SMALL)
        torch.testing.assert_close(caches[0][b, :m1], ref.compress_keys_ref(k[b:b + 1, :L], 8, 4)[0])
        torch.testing.assert_close(caches[1][b, :m2], ref.compress_keys_ref(k[b:b + 1, :L], 32, 16)[0])
        assert torch.isnan(caches[0][b, m1:]).all()


def check_select():
    """Selection and pooled scores vs the fp64 reference (K2: unmasked loop over the tiles every row sees + masked
    tail loop; K1: visibility on the per-token head sums, block max by register splits, halo shift by tl.gather):
    the first and third cases reach mask-free K1 and K2 tiles, the third spanning several K2 tiles of the
    interpreter's 16 windows; in the fourth, programs straddle the end of the first K2 tile, position 271; the
    fifth has 3 heads per group, so padded head rows."""
    _check_select_cases()


def _check_select_cases():
    from sala.ops.infllmv2 import triton_selection

    for B, G, q_offset, Tq, seed in ((1, 2, 0, 70, 1), (2, 4, 90, 11, 2), (1, 2, 300, 21, 3), (1, 2, 250, 24, 4),
                                     (1, 3, 200, 15, 5)):
        q, k, _ = _qkv(B, q_offset + Tq, 2, G, 16, seed, Tq=Tq)
        k1, k2 = ref.compress_keys_ref(k, 8, 4), ref.compress_keys_ref(k, 32, 16)
        got = select_blocks(q, k1, k2, SMALL, q_offset=q_offset)
        pos = (q_offset + torch.arange(Tq))[None].expand(B, Tq)
        want = ref.select_blocks_ref(q.double(), k1.double(), k2.double(), pos, SMALL, 0.25)
        assert_same_selection(got, want, q, k1, k2, pos, SMALL, 0.25)
        n_blocks = (q_offset + Tq - 1) // SMALL.block_size + 1
        pooled = triton_selection.pooled_block_scores_triton(q, k1, k2, pos.to(torch.int32), SMALL, 0.25, n_blocks)
        want_pooled = ref.pooled_block_scores_ref(q.double(), k1.double(), k2.double(), pos, SMALL, 0.25, n_blocks)
        torch.testing.assert_close(pooled.double(), want_pooled, rtol=1e-4, atol=1e-6)


def check_topk():
    """topk_blocks_triton == topk_block_indices: +inf (forced) and -inf (future) columns, rows with fewer finite
    columns than k, negative and -0.0 values, ties (lowest columns win), `limits` with NaN garbage past each
    row's limit (never read); rows wider than max_cols by tiles and candidates, the reference for k > max_cols and
    other dtypes, and `limits` refused there."""
    _check_topk_cases()


def _check_topk_cases():
    from sala.ops.infllmv2 import triton_topk

    g = torch.Generator().manual_seed(5)
    for B, H, T, n, K in ((1, 2, 5, 7, 10), (2, 2, 9, 40, 10), (1, 1, 3, 300, 96), (1, 1, 4, 33, 6)):
        x = torch.rand(B, H, T, n, generator=g)
        x[..., 0] = float("inf")
        x[..., -3:] = float("-inf")
        x[0, 0, -1, :] = float("-inf")
        x[0, -1, 0] = torch.randn(n, generator=g)
        x[0, -1, 0, 1] = -0.0
        _assert_topk_close(triton_topk.topk_blocks_triton(x, K), x, K)
        lim = torch.randint(1, n + 1, (B, T), generator=g, dtype=torch.int32)
        past = (torch.arange(n)[None, None, None, :] >= lim[:, None, :, None]).expand_as(x)
        assert not torch.equal(lim, torch.full_like(lim, n))
        y, want_in = x.clone(), x.clone()
        y[past], want_in[past] = float("nan"), float("-inf")
        _assert_topk_close(triton_topk.topk_blocks_triton(y, K, limits=lim), want_in, K)
    # wide rows (more columns than max_cols): tiles, then a round over their candidates (recursing), exactly the
    # reference's indices: ties in and across tiles, +inf, -inf runs, a row with fewer finite columns than K
    for n, K, cols in ((300, 10, 64), (1000, 24, 128), (517, 6, 16)):
        x = torch.randint(0, 6, (5, n), generator=g).float() / 4     # many ties
        x[0, :: 7] = float("inf")
        x[1, 50:] = float("-inf")
        x[2, : n - 3] = float("-inf")
        x[3] = torch.randn(n, generator=g)
        with _Launches(triton_topk, "_topk_blocks_kernel") as spy:
            got = triton_topk.topk_blocks_triton(x, K, max_cols=cols)
        assert spy.calls >= 2, (n, K, spy.calls)                     # the tiles' round and the candidates'
        assert torch.equal(got, ref.topk_block_indices(x, K)), (n, K)
        # rows of a wider buffer (row stride > n), poisoned past n: the tiles are read in place, the last short
        buf = torch.full((5, n + 13), float("nan"))
        buf[:, :n] = x
        assert torch.equal(triton_topk.topk_blocks_triton(buf[:, :n], K, max_cols=cols), got), (n, K)
    assert triton_topk.topk_blocks_triton(torch.empty(0, 300), 10, max_cols=64).shape == (0, 10)   # no rows
    # K > max_cols (a tile could not hold a row's top K) and non-fp32 rows: the reference, no kernel launch
    x = torch.randint(0, 6, (3, 100), generator=g).float() / 4
    for y, K, cols in ((x, 20, 16), (x.double(), 6, 16)):
        with _Launches(triton_topk, "_topk_blocks_kernel") as spy:
            got = triton_topk.topk_blocks_triton(y, K, max_cols=cols)
        assert spy.calls == 0 and torch.equal(got, ref.topk_block_indices(y, K)), (K, y.dtype, spy.calls)
    try:                                                 # limits: one-kernel rows only
        triton_topk.topk_blocks_triton(x[None, None], 6, limits=torch.full((1, 3), 50, dtype=torch.int32),
                                       max_cols=16)
    except ValueError as ex:
        assert "limits need fp32 rows of <= 16 columns" in str(ex), ex
    else:
        raise AssertionError("limits on rows wider than max_cols were accepted")
    x = torch.full((2, 12), 0.25)                        # all tied: the lowest columns
    x[1, 5:] = float("-inf")
    got = triton_topk.topk_blocks_triton(x, 4)
    assert got.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]], got
    x = -torch.rand(3, 40, generator=g)                  # exactly K non-negative values: done before any pass
    x[0, 5:15] = torch.rand(10, generator=g)
    x[1, 7:17] = 1.0 + torch.arange(10.0)                # K-th and (K+1)-th far apart: an early cut-off
    x[2, :] = torch.tensor([0.5, 0.25] * 20)             # ties at the cut-off: every pass, lowest columns
    got = triton_topk.topk_blocks_triton(x, 10)
    _assert_topk_close(got, x, 10)
    assert got[0].tolist() == list(range(5, 15)) and got[1].tolist() == list(range(7, 17)), got
    assert got[2].tolist() == list(range(0, 40, 2))[:10], got


def _assert_topk_close(got, x, K):
    """Indices equal to the reference's, or (ties at the cut-off) a set with the same multiset of values."""
    want = ref.topk_block_indices(x, K)
    if torch.equal(got, want):
        return
    for r in (got != want).any(-1).nonzero().tolist():
        a, w = got[tuple(r)], want[tuple(r)]
        assert torch.equal(a == -1, w == -1) and torch.equal(a, torch.sort(a).values), (r, a, w)
        va, vw = x[tuple(r)][a[a >= 0].long()], x[tuple(r)][w[w >= 0].long()]
        assert torch.equal(torch.sort(va).values, torch.sort(vw).values), (r, a, w)


Q_OFFSET = 79   # the attention cases' 17 queries: positions 79..95 of 96 keys, in query blocks 4 and 5


def _attention_case(seed, B=1, G=2):
    q, k, v = _qkv(B, 96, 2, G, 16, seed, Tq=96 - Q_OFFSET)
    idx = ref.select_blocks_ref(q, ref.compress_keys_ref(k, 8, 4), ref.compress_keys_ref(k, 32, 16),
                                (Q_OFFSET + torch.arange(96 - Q_OFFSET))[None].expand(B, 96 - Q_OFFSET), SMALL, 0.25)
    return q, k, v, idx


def check_forward():
    """Forward vs the reference, one, two and four selected blocks per iteration of the walk."""
    q, k, v, idx = _attention_case(3)
    _mode("reference")
    want = block_sparse_attention(q, k, v, idx, SMALL, q_offset=Q_OFFSET)
    for kpi in (1, 2, 4):
        _mode("triton")
        got = block_sparse_attention(q, k, v, idx, SMALL, q_offset=Q_OFFSET,
                                     kernel_config=SparseKernelConfig(fwd_blocks_per_iter=kpi))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def check_flat_indices_shared():
    """The sparse layers of one forward call share the flat-token indices of one shape (computed once, read-only):
    their values are the per-call formula's, a second call with the shape reuses them, and its output is the same."""
    from sala.ops.infllmv2 import sparse_attention as sa

    q, k, v, idx = _attention_case(3)
    B, Tq, Tk, bs = q.shape[0], q.shape[1], k.shape[1], SMALL.block_size
    sa._flat_indices.cache_clear()
    _mode("triton")
    first = block_sparse_attention(q, k, v, idx, SMALL, q_offset=Q_OFFSET)
    second = block_sparse_attention(q, k, v, idx, SMALL, q_offset=Q_OFFSET)
    info = sa._flat_indices.cache_info()
    assert (info.misses, info.hits) == (1, 1), info
    assert torch.equal(first, second)
    pos, kbase, gbase, gid_kstart, gid_blk, n_gid = sa._flat_indices(B, Tq, Tk, Q_OFFSET, bs, q.device, False)
    nbk = -(-Tk // bs)
    rows = torch.arange(B).repeat_interleave(Tq)
    assert pos.tolist() == (Q_OFFSET + torch.arange(Tq)).repeat(B).tolist() and pos.dtype == torch.int32
    assert kbase.tolist() == (rows * Tk).tolist() and gbase.tolist() == (rows * nbk).tolist()
    assert n_gid == B * nbk and gid_blk.tolist() == [b for _ in range(B) for b in range(nbk)]
    assert gid_kstart.tolist() == [r * Tk + b * bs for r in range(B) for b in range(nbk)]
    # indices made under inference_mode are never handed to a forward that records a backward
    with torch.inference_mode():
        block_sparse_attention(q, k, v, idx, SMALL, q_offset=Q_OFFSET)
    assert sa._flat_indices.cache_info().misses == 2
    qg = q.clone().requires_grad_()
    block_sparse_attention(qg, k, v, idx, SMALL, q_offset=Q_OFFSET).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def check_backward():
    """dq, dk, dv vs the reference, one, two and four selected blocks per iteration of the dq walk."""
    q, k, v, idx = _attention_case(4, G=4)
    do = torch.randn(q.shape)
    grads = {}
    for mode, kpi in (("reference", 1), ("triton", 1), ("triton", 2), ("triton", 4)):
        _mode(mode)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*leaves, idx, SMALL, q_offset=Q_OFFSET,
                                     kernel_config=SparseKernelConfig(fwd_blocks_per_iter=kpi))
        grads[mode, kpi] = torch.autograd.grad(out, leaves, do)
    _mode("triton")
    for kpi in (1, 2, 4):
        for got, want in zip(grads["triton", kpi], grads["reference", 1]):
            torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def check_varlen():
    q, k, v = _qkv(1, 150, 2, 2, 16, 5)
    cu = torch.tensor([0, 70, 150])
    do = torch.randn(q.shape)
    res = []
    for mode in ("triton", "reference"):
        _mode(mode)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = infllmv2_attention(*leaves, SMALL, cu_seqlens=cu)
        res.append((out.detach(), *torch.autograd.grad(out, leaves, do)))
    _mode("triton")
    for got, want in zip(*res):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def _decode_case(S: int, G: int, seed: int, lengths: list[int], fill: float = 0.0, poison_kv: bool = False):
    """A decode step's inputs: caches of S slots (2 KV heads, d 16) filled for `lengths`, compressed-key caches
    initialised to `fill` then updated, optionally NaN in the K/V slots past each length, and each sequence's
    last query. Returns (qd, k, v, k1c, k2c, lengths int32)."""
    B = len(lengths)
    q, k, v = _qkv(B, S, 2, G, 16, seed)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    n1, n2 = compressed_lengths(S, SMALL)
    k1c, k2c = torch.full((B, n1, 2, 16), fill), torch.full((B, n2, 2, 16), fill)
    update_compressed_keys(k, k1c, k2c, lengths, SMALL, new_tokens=S)
    if poison_kv:
        for b in range(B):
            k[b, int(lengths[b]):], v[b, int(lengths[b]):] = float("nan"), float("nan")
    qd = torch.stack([q[b, int(lengths[b]) - 1] for b in range(B)])
    return qd, k, v, k1c, k2c, lengths


def check_decode():
    """Decode (split-N selection, split-K attention) vs the reference; both split kernels really ran."""
    from sala.ops.infllmv2 import triton_decode

    qd, k, v, k1c, k2c, lengths = _decode_case(120, 2, 6, [120, 85])
    with _Spy(triton_decode, "sparse_decode_splitk") as sk, \
            _Spy(triton_decode, "pooled_block_scores_decode_split") as ss:
        got = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL)
    assert (sk.calls, ss.calls) == (1, 1), (sk.calls, ss.calls)
    _mode("reference")
    want = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL)
    _mode("triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def check_decode_several_queries_per_row():
    """A verify step's decode (T = 3 queries per cache row, each at its own length) vs the reference."""
    from sala.ops.infllmv2 import triton_decode

    T = 3
    qd, k, v, k1c, k2c, lengths = _decode_case(120, 2, 8, [118, 83])
    q = torch.randn(2 * T, *qd.shape[1:], dtype=qd.dtype)
    seqlens = torch.tensor([n - T + j + 1 for n in lengths.tolist() for j in range(T)], dtype=torch.int32)
    with _Spy(triton_decode, "pooled_block_scores_decode_split") as ss:
        got = infllmv2_decode(q, k, v, k1c, k2c, seqlens, SMALL, queries_per_row=T)
    assert ss.calls == 1, ss.calls
    _mode("reference")
    want = infllmv2_decode(q, k, v, k1c, k2c, seqlens, SMALL, queries_per_row=T)
    one = torch.stack([infllmv2_decode(q[i:i + 1], k[i // T:i // T + 1], v[i // T:i // T + 1],
                                       k1c[i // T:i // T + 1], k2c[i // T:i // T + 1], seqlens[i:i + 1], SMALL)[0]
                       for i in range(2 * T)])
    _mode("triton")
    torch.testing.assert_close(want, one)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ band split (forced blocks as query tiles)
# topk 5 + local 2: 7 blocks per query, 4 of them forced (init 0 and the band qb-2..qb), 3 selected freely;
# INIT2: two init blocks and a one-block band.
BAND = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=5, init_blocks=1, window_size=32)
BAND_INIT2 = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=5, init_blocks=2, window_size=16)


class _Launches:
    """Count the launches of a Triton kernel attribute of `module` (kernel[grid](...))."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, 0
        self.real = getattr(module, name)

    def __enter__(self):
        outer = self

        class Counting:
            def __getitem__(self, grid):
                outer.calls += 1
                return outer.real[grid]

        setattr(self.module, self.name, Counting())
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)


class _PoisonedEmpty:
    """torch.empty_like returns NaN-filled floating tensors inside the block (outputs must be fully written)."""

    def __enter__(self):
        self.real = torch.empty_like

        def poisoned(t, *a, **kw):
            out = self.real(t, *a, **kw)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        torch.empty_like = poisoned
        return self

    def __exit__(self, *exc):
        torch.empty_like = self.real


def _ref_selection(q, k, p, q_offset):
    """The reference selection's blocks for queries q [B, Tq, ...] at positions q_offset.. (the attention checks'
    input; the selection kernels have checks of their own)."""
    B, Tq = q.shape[:2]
    k1 = ref.compress_keys_ref(k, p.kernel_size, p.kernel_stride)
    k2 = ref.compress_keys_ref(k, p.k2_kernel, p.k2_stride)
    return ref.select_blocks_ref(q, k1, k2, (q_offset + torch.arange(Tq))[None].expand(B, Tq), p,
                                 q.shape[-1] ** -0.5)


def check_band_split_forward():
    """Band split (forced blocks by the band kernel, the rest by the per-token walk, fwd_query_tile 1, and by the
    default union walk of 4 queries) vs the reference on the same selected blocks: 2 batch rows of 9 queries at the
    odd offset 125 (the interpreter's first 16-query band tile holds query blocks 7 and 8 and both rows' key
    bases), NaN-poisoned outputs, one and two init blocks; the whole layer (dense prefix, selection kernels,
    attention) with and without the split; the kernels really ran. (bf16: the GPU test; Triton's interpreter has
    no bf16 arithmetic.)"""
    from sala.ops.infllmv2 import triton_attention

    for p, (B, T, Tq, Hkv) in ((BAND, (2, 134, 9, 2)), (BAND_INIT2, (1, 107, 107, 1))):
        q, k, v = _qkv(B, T, Hkv, 2, 16, 21, Tq=Tq)
        off = T - Tq
        qs = q[:, max(0, p.dense_positions - off):]
        so = max(off, p.dense_positions)
        idx = _ref_selection(qs, k, p, so)
        _mode("reference")
        want = block_sparse_attention(qs.double(), k.double(), v.double(), idx, p, q_offset=so)
        _mode("triton")
        tol = dict(atol=2e-5, rtol=1e-4)
        with _PoisonedEmpty():
            walk = block_sparse_attention(qs, k, v, idx, p, q_offset=so)          # forced_blocks not promised
        outs = [walk]
        for config, walker in ((SparseKernelConfig(fwd_query_tile=1), "_sparse_fwd_kernel"),
                               (SparseKernelConfig(), "_sparse_union_fwd_kernel")):
            with _Launches(triton_attention, "_sparse_band_fwd_kernel") as spy, \
                    _Launches(triton_attention, walker) as walked, _PoisonedEmpty():
                outs.append(block_sparse_attention(qs, k, v, idx, p, q_offset=so, forced_blocks=True,
                                                   kernel_config=config))
            assert (spy.calls, walked.calls) == (1, 1), (walker, spy.calls, walked.calls)
        for out in outs:
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), want, **tol)
        if B == 1:   # the whole layer (dense prefix + selection + attention) against the reference
            on = [infllmv2_attention(q, k, v, p, kernel_config=c)
                  for c in (SparseKernelConfig(fwd_query_tile=1), None)]
            _mode("reference")
            want_layer = infllmv2_attention(q, k, v, p)
            _mode("triton")
            for out in on:
                torch.testing.assert_close(out, want_layer, **tol)


def check_band_split_lse_and_backward():
    """The band split's lse (per-token walk and default union walk) equals the one-walk kernel's (the backward
    reads it); gradients through the layer (forward and dq split) equal the reference's; the dq kernels directly,
    with and without the split."""
    from sala.ops.infllmv2 import triton_attention

    p = BAND
    T = 121                                    # 9 sparse queries a row: a 16-query band tile holds both rows
    q, k, v = _qkv(2, T, 1, 2, 16, 22)
    dp = p.dense_positions
    idx = _ref_selection(q[:, dp:], k, p, dp)
    Tq = T - dp
    qf = q[:, dp:].reshape(-1, 2, 16).contiguous()
    kf, vf = k.reshape(-1, 1, 16), v.reshape(-1, 1, 16)
    pos = (dp + torch.arange(Tq)).repeat(2).to(torch.int32)
    kbase = torch.arange(2).repeat_interleave(Tq) * T
    o_w, lse_w = triton_attention.sparse_attention_fwd(qf, kf, vf, idx, pos, kbase, p.block_size, 0.25)
    for config in (SparseKernelConfig(fwd_query_tile=1), SparseKernelConfig()):
        o_b, lse_b = triton_attention.sparse_attention_fwd(qf, kf, vf, idx, pos, kbase, p.block_size, 0.25,
                                                           band=(p.init_blocks, p.local_blocks), config=config)
        torch.testing.assert_close(o_b, o_w, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse_b, lse_w, atol=2e-5, rtol=1e-5)
    do = torch.randn(q.shape)
    grads = []
    for mode in ("triton", "reference"):
        _mode(mode)
        with _Launches(triton_attention, "_sparse_band_bwd_dq_kernel") as spy:
            leaves = [t[:1].clone().requires_grad_() for t in (q, k, v)]
            grads.append(torch.autograd.grad(infllmv2_attention(*leaves, p), leaves, do[:1]))
        assert spy.calls == int(mode == "triton"), (mode, spy.calls)
    _mode("triton")
    for other in grads[1:]:
        for got, want in zip(other, grads[0]):
            torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    # the dq kernels directly, both batch rows (a band tile with two key bases), NaN-poisoned dq buffer
    do_f = torch.randn(qf.shape)
    args = (do_f, qf, kf, vf, o_w, lse_w, idx, pos, kbase)
    _, gbase, gid_kstart, gid_blk = _flat_tables(2, Tq, T, p.block_size, dp)
    tail = (gbase, 2 * -(-T // p.block_size), gid_kstart, gid_blk, p.block_size, 0.25)
    with _PoisonedEmpty():
        dq_b = triton_attention.sparse_attention_bwd(*args, *tail, band=(p.init_blocks, p.local_blocks))[0]
    dq_w = triton_attention.sparse_attention_bwd(*args, *tail)[0]
    assert torch.isfinite(dq_b).all()
    torch.testing.assert_close(dq_b, dq_w, atol=5e-5, rtol=1e-4)


def check_band_split_varlen():
    """Packed documents with the band split vs the reference (forward and dq, dk, dv): a document with 3 sparse
    queries puts three key bases into one band tile."""
    p = BAND
    dp = p.dense_positions
    lens = [dp + 3, 20, dp + 12, dp + 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    q, k, v = _qkv(1, int(cu[-1]), 1, 2, 16, 23)
    do = torch.randn(q.shape)
    res = []
    for mode in ("triton", "reference"):
        _mode(mode)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = infllmv2_attention(*leaves, p, cu_seqlens=cu)
        res.append((out.detach(), *torch.autograd.grad(out, leaves, do)))
    _mode("triton")
    for got, want in zip(*res):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


# ------------------------------------------------------------------ split-K decode
class _Spy:
    """Count the calls of module attribute `name` (proves a variant's kernels really ran)."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, 0
        self.real = getattr(module, name)

    def __enter__(self):
        def wrapper(*args, **kwargs):
            self.calls += 1
            return self.real(*args, **kwargs)

        setattr(self.module, self.name, wrapper)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)


def _flat_tables(B, Tq, Tk, bs, q_offset):
    """The flat per-token / per-global-block tables block_sparse_attention builds (kernel-level calls)."""
    nbk = -(-Tk // bs)
    pos = (q_offset + torch.arange(Tq)).repeat(B).to(torch.int32)
    brow = torch.arange(B).repeat_interleave(Tq)
    gids = torch.arange(B * nbk)
    return pos, brow * nbk, (gids // nbk) * Tk + (gids % nbk) * bs, (gids % nbk).to(torch.int32)


def check_splitk_decode():
    """Split-K decode vs the reference: 2 sequences, stale NaN cache slots, NaN-filled output buffer; 2 splits of 2
    blocks (the combine is exercised) and one block per split (more splits than blocks: clamped)."""
    from sala.ops.infllmv2 import triton_decode

    qd, k, v, k1c, k2c, lengths = _decode_case(120, 4, 10, [117, 85], poison_kv=True)
    with _Spy(triton_decode, "sparse_decode_splitk") as spy:
        got = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL, out=torch.full_like(qd, float("nan")),
                              kernel_config=SparseKernelConfig(decode_min_programs=8))
        got1 = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL,
                               kernel_config=SparseKernelConfig(decode_min_programs=64))
    assert spy.calls == 2, spy.calls
    _mode("reference")
    want = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL)
    _mode("triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got1, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------ split-N decode selection
def check_split_decode_select():
    """Split-N decode selection: pooled scores and indices vs the reference for 3 sequences (long, short, dense
    regime) with NaN-poisoned unused K/V/K1/K2 cache slots; K2 and K1 both split over several programs."""
    from sala.ops.infllmv2 import triton_decode, triton_utils

    B, S = 3, 320
    qd, k, v, k1c, k2c, lengths = _decode_case(S, 4, 11, [317, 150, 40], fill=float("nan"), poison_kv=True)
    n2 = compressed_lengths(S, SMALL)[1]
    pos = lengths.long() - 1
    n_blocks = S // SMALL.block_size
    config = SparseKernelConfig(decode_select_programs=64)
    splits2 = triton_decode.decode_select_splits(B, 2, n2, 16, 64)[0]
    splits1 = triton_decode.decode_select_splits(B, 2, n_blocks, triton_utils.select_nb(4, 64), 64)[0]
    assert splits2 >= 2 and splits1 >= 3, (splits2, splits1)
    pooled = triton_decode.pooled_block_scores_decode_split(qd, k1c, k2c, pos.to(torch.int32), SMALL, 0.25,
                                                            n_blocks, config)
    want = ref.pooled_block_scores_ref(qd[:, None].double(), k1c.double(), k2c.double(), pos[:, None], SMALL,
                                       0.25, n_blocks)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(pooled), fin) and torch.equal(pooled[~fin], want[~fin].float())
    torch.testing.assert_close(pooled[fin].double(), want[fin], atol=1e-6, rtol=1e-5)
    assert_same_selection(ref.topk_block_indices(pooled, SMALL.total_blocks),
                          ref.topk_block_indices(want, SMALL.total_blocks), qd[:, None], k1c, k2c, pos[:, None],
                          SMALL, 0.25)
    with _Spy(triton_decode, "pooled_block_scores_decode_split") as spy:
        got = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL, out=torch.full_like(qd, float("nan")),
                              kernel_config=config)
    assert spy.calls == 1, spy.calls
    _mode("reference")
    want_o = infllmv2_decode(qd, k, v, k1c, k2c, lengths, SMALL)
    _mode("triton")
    torch.testing.assert_close(got, want_o, atol=2e-5, rtol=1e-4)


def check_warmup_length_classes():
    """The warm-up's tiny launches run for real (top-k with and without limits, split decode selection, batch 2)."""
    from sala.ops.infllmv2 import triton_decode

    n = triton_decode.warmup_length_classes(300, SMALL, batch=2, heads=(4, 2, 16), device="cpu", dtype=torch.float32)
    assert n == 2 * 2 + 2, n       # row widths 16 and 32; capacities 256 and 512 share one split class (SP2 2)


def check_tuning_sweep():
    """The bench's launch sweep runs every setting, records the output check, and returns a config whose output
    matched (tiny shape; the interpreter ignores tile sizes, not the blocks per iteration)."""
    from sala.bench import kernels_sparse as ks

    chosen, out = ks.sweep(75, device="cpu", params=SMALL, heads=(4, 2, 16), dtype=torch.float32, warmup=0, rep=1,
                           select_configs=[(128, 64, 8, None), (64, 64, 4, 2)],
                           fwd_configs=[(4, None, 1), (4, 2, 2)], band_configs=[(64, 4, 2), (128, 8, 3)])
    assert [r["config"] for r in out["select"]] == [[128, 64, 8, None], [64, 64, 4, 2]]
    assert all(r["rows_differing_from_first"] == 0 for r in out["select"]), out["select"]
    assert all(r["max_abs_diff_vs_first"] < 1e-4 for r in out["attention_fwd"]), out["attention_fwd"]
    assert [r["config"] for r in out["band"]] == [[64, 4, 2], [128, 8, 3]], out["band"]
    assert all(r["max_abs_diff_vs_first"] < 1e-4 for r in out["band"]), out["band"]
    assert isinstance(chosen, SparseKernelConfig) and out["chosen"] == dataclasses.asdict(chosen)
    assert chosen.fwd_blocks_per_iter in (1, 2) and chosen.band_rows in (64, 128)
    assert chosen.fwd_query_tile == SparseKernelConfig().fwd_query_tile     # per-token settings timed, walk kept


def check_topk_ties():
    """Constructed exact ties at the cut-off (all blocks equal; two adjacent blocks sharing one K1 window maximum):
    prefill selection, its wide rows (tiles and candidates; the reference for k > topk_max_cols) and decode
    selection of the kernels keep the lowest block index, the same indices as the reference
    (tests/ops/test_infllmv2.py builds the cases)."""
    from test_infllmv2 import TIES, expected_tie_indices, tie_case

    from sala.ops.infllmv2 import triton_topk
    from sala.ops.infllmv2.decode import decode_select_blocks

    for kind in ("flat", "shared"):
        q, k, _, free = tie_case(kind)
        k1, k2 = ref.compress_keys_ref(k, 8, 4), ref.compress_keys_ref(k, 32, 16)    # exact means of 0s and 1s
        want = expected_tie_indices(200, 64, free)
        # prefill: the queries of the last block (positions 192..199: the shared blocks 5 and 6 are not forced)
        # 13 blocks: one kernel; 8 columns a row: tiles of 8, then their 2 x 5 candidates (the reference: as many
        # candidates as columns); 4: K = 5 > 4 (the reference)
        for config, calls in ((SparseKernelConfig(), 1), (SparseKernelConfig(topk_max_cols=8), 1),
                              (SparseKernelConfig(topk_max_cols=4), 0)):
            with _Launches(triton_topk, "_topk_blocks_kernel") as spy:
                got = select_blocks(q[:, 192:], k1, k2, TIES, q_offset=192, scale=0.25, kernel_config=config)
            assert spy.calls == calls, (kind, config.topk_max_cols, spy.calls)
            assert torch.equal(got, want[:, :, 192 - 64:]), (kind, config.topk_max_cols,
                                                             (got != want[:, :, 192 - 64:]).nonzero()[:5])
        n1, n2 = compressed_lengths(256, TIES)
        k1c, k2c = torch.zeros(2, n1, 2, 16), torch.zeros(2, n2, 2, 16)
        kc = torch.cat([torch.cat([k, k], 0), torch.zeros(2, 56, 2, 16)], 1)
        lengths = torch.tensor([200, 150], dtype=torch.int32)
        ref.update_compressed_keys_ref(kc, k1c, k2c, lengths, TIES, new_tokens=200)
        qd = torch.cat([q[:, 199], q[:, 149]], 0)
        for config in (SparseKernelConfig(), SparseKernelConfig(topk_max_cols=8),     # 16 blocks: kernel; tiles +
                       SparseKernelConfig(topk_max_cols=4)):                         # candidates; the reference
            dec = decode_select_blocks(qd, k1c, k2c, lengths, TIES, 16, scale=0.25, kernel_config=config)
            assert torch.equal(dec[:, :, 0], want[0, :, [199 - 64, 149 - 64]].permute(1, 0, 2)), (kind, dec)
        _mode("reference")
        ref_dec = decode_select_blocks(qd, k1c, k2c, lengths, TIES, 16, scale=0.25)
        _mode("triton")
        assert torch.equal(dec, ref_dec)
    x = torch.ones(3, 40)                                   # the top-k kernel alone: an all-tied row, shared maxima
    x[1, 10:12] = 2.0
    x[2, ::3] = 0.5
    for K in (2, 3, 5, 12):                       # max_cols 8: tiles and candidates (K <= 8), or the reference
        assert torch.equal(triton_topk.topk_blocks_triton(x, K), ref.topk_block_indices(x, K))
        got = triton_topk.topk_blocks_triton(x, K, max_cols=8)
        assert torch.equal(got, ref.topk_block_indices(x, K)), K


CHECKS = {name[6:]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running", file=sys.stderr)
        return 2
    results = {}
    for name, fn in CHECKS.items():
        torch.manual_seed(0)
        _mode("triton")
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
