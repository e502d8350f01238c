"""Paged K/V of the sparse layers (sala.ops.infllmv2.paged): every paged op equals the contiguous op on
`gather_paged` of the same pages.

Pools are built with pages in shuffled order, two rows sharing their first pages (a shared prefix), and NaN in page
0 (the scratch page), in every page nobody owns and in every slot past a row's length: a result with a NaN read
something it must not. The references run everywhere; the Triton paths run in Triton's interpreter on a CPU-only
machine (tests/conftest.py sets TRITON_INTERPRET=1 for the session) and compiled on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from sala.ops.infllmv2 import (
    SparseKernelConfig,
    SparseParams,
    compress_keys,
    compress_window_range,
    compressed_lengths,
    gather_paged,
    gather_paged_range,
    infllmv2_attention,
    infllmv2_attention_paged,
    infllmv2_decode,
    paged_rows,
    update_compressed_keys,
    write_paged,
    write_paged_positions,
    write_paged_rows,
)
from sala.ops.infllmv2 import paged as paged_mod
from sala.ops.infllmv2 import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
# block 16: 4 blocks a query (topk 2 + 2 local), dense below 64; BAND: 7 blocks (4 forced), dense below 112;
# P64: the released block size, 3 blocks a query, dense below 192
SMALL = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)
BAND = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=5, init_blocks=1, window_size=32)
P64 = SparseParams(block_size=64, kernel_size=32, kernel_stride=16, topk=2, init_blocks=1, window_size=64)


def _mode(monkeypatch, name: str) -> None:
    if name == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SALA_KERNELS", name)


@pytest.fixture(params=["reference", "triton"])
def kernels(request, monkeypatch):
    """Each test twice: the references, then the Triton kernels (the interpreter on a CPU-only machine)."""
    _mode(monkeypatch, request.param)
    return request.param


def paged_case(lengths, BS, Hkv=2, D=32, seed=0, shared_blocks=0, spare_blocks=1, free_pages=3):
    """Keys / values of rows of `lengths` keys, contiguous and in a page pool.

    Returns k, v [R, NB * BS, Hkv, D] (NaN past each length), k_pages, v_pages [P, BS, Hkv, D] and the table int32
    [R, NB]: row r owns ceil(L / BS) + spare_blocks pages in shuffled order (the spare ones hold only NaN), rows
    after the first share row 0's first `shared_blocks` pages (same keys), table entries past a row's pages are 0.
    Page 0 and `free_pages` pages nobody owns are NaN."""
    g = torch.Generator().manual_seed(seed)
    R = len(lengths)
    assert all(L > shared_blocks * BS for L in lengths)
    owned = [-(-L // BS) + spare_blocks for L in lengths]
    NB = max(owned) + 1
    k = torch.randn(R, NB * BS, Hkv, D, generator=g)
    v = torch.randn(R, NB * BS, Hkv, D, generator=g)
    k[1:, :shared_blocks * BS], v[1:, :shared_blocks * BS] = k[0, :shared_blocks * BS], v[0, :shared_blocks * BS]
    for r, L in enumerate(lengths):
        k[r, L:], v[r, L:] = NAN, NAN
    n_new = owned[0] + sum(n - shared_blocks for n in owned[1:])
    P = 1 + n_new + free_pages
    ids = (1 + torch.randperm(P - 1, generator=g))[:n_new].tolist()
    table = torch.zeros(R, NB, dtype=torch.int32)
    for r, n in enumerate(owned):
        for j in range(n):
            table[r, j] = table[0, j] if r and j < shared_blocks else ids.pop()
    kp = torch.full((P, BS, Hkv, D), NAN)
    vp = torch.full((P, BS, Hkv, D), NAN)
    for r, n in enumerate(owned):
        for j in range(n):
            kp[table[r, j]] = k[r, j * BS:(j + 1) * BS]
            vp[table[r, j]] = v[r, j * BS:(j + 1) * BS]
    return [t.to(DEVICE) for t in (k, v, kp, vp, table)]


def _assert_same(got, want, **tol):
    """Equal shapes, NaN where the other has NaN, values within tol (exact by default)."""
    torch.testing.assert_close(got, want, equal_nan=True, **(tol or dict(atol=0, rtol=0)))


# ----------------------------------------------------------------------------------------- gather / write
def test_gather_matches_plain_indexing():
    k, _, kp, _, table = paged_case([37, 50], 16, seed=1, shared_blocks=2)
    for L in (0, 1, 16, 37, table.shape[1] * 16):
        _assert_same(gather_paged(kp, table, L), k[:, :L])
        _assert_same(gather_paged(kp, table[1], L), k[1:, :L])
    t = torch.arange(50, device=DEVICE)
    assert torch.equal(gather_paged(kp, table[1], 50)[0], kp[table[1, t // 16].long(), t % 16])
    for s, e in ((0, 0), (0, 37), (5, 37), (16, 32), (17, 18), (31, 49), (48, 48)):
        _assert_same(gather_paged_range(kp, table[1], s, e), k[1:, s:e])
    # the rows share their first two pages: row 1's prefix is row 0's
    assert torch.equal(gather_paged(kp, table[1], 32), gather_paged(kp, table[0], 32))


def test_write_paged_matches_plain_indexing():
    k, _, kp, _, table = paged_case([40, 70], 16, seed=2)
    g = torch.Generator().manual_seed(3)
    want = kp.clone()
    for start, T in ((0, 5), (5, 30), (40, 1), (47, 17), (64, 0)):
        x = torch.randn(T, 2, 32, generator=g).to(DEVICE)
        write_paged(kp, table[1], start, x)
        for j in range(T):
            t = start + j
            want[table[1, t // 16], t % 16] = x[j]
        _assert_same(kp, want)
    _assert_same(gather_paged(kp, table[1], 64)[0, :5], want[table[1, 0], :5])


def test_write_paged_positions_matches_plain_indexing():
    """A verify step: T = 3 tokens per row at each row's positions, one row past its capacity (clamped to the last
    slot), one row that owns no page (writes land in the scratch page 0)."""
    k, _, kp, _, table = paged_case([40, 30, 20], 16, seed=4)
    NB = table.shape[1]
    free = sorted(set(range(1, kp.shape[0])) - set(table.flatten().tolist()))
    table[1, NB - 1] = free[0]                      # row 1 owns its last block: the clamped write lands there
    table[2] = 0
    positions = torch.tensor([[40, 41, 42], [NB * 16 - 3, NB * 16 - 2, NB * 16 + 5], [0, 1, 2]], device=DEVICE)
    x = torch.randn(3, 3, 2, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    want = kp.clone()
    for r in range(3):
        for j in range(3):
            t = min(int(positions[r, j]), NB * 16 - 1)
            want[table[r, t // 16], t % 16] = x[r, j]
    before = kp.clone()
    write_paged_positions(kp, table, positions, x)
    _assert_same(kp[1:], want[1:])                  # page 0 (row 2's scratch writes) aside
    assert torch.equal(kp[0, :3], x[2])
    # the rows once, written for K and V alike (a decode step's layers share them): the same writes
    again = before.clone()
    write_paged_rows(again, paged_rows(table, positions, 16), x)
    torch.testing.assert_close(again, kp, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="rows int64"):
        write_paged_rows(again, paged_rows(table, positions, 16)[:-1], x)
    with pytest.raises(ValueError, match="positions must be int64 \\[R, T\\]"):
        paged_rows(table, positions[:2], 16)


# -------------------------------------------------------------------------------------- compressed keys
@pytest.mark.parametrize("BS, p", [(16, SMALL), (64, P64)])
def test_update_compressed_keys_paged_equals_contiguous(kernels, BS, p):
    """A prefill then token-by-token steps, paged vs contiguous caches (the same path: reference or kernel); K1/K2
    caches start NaN, so a window written wrongly or not at all shows."""
    ends = [3 * BS + 9, 2 * BS + 13]
    k, _, kp, _, table = paged_case(ends, BS, seed=6, shared_blocks=1)
    n1, n2 = compressed_lengths(table.shape[1] * BS, p)
    caches = {name: [torch.full((2, n, 2, 32), NAN, device=DEVICE) for n in (n1, n2)] for name in ("paged", "flat")}
    lengths = torch.tensor(ends, dtype=torch.int32, device=DEVICE) - 6
    update_compressed_keys(kp, *caches["paged"], lengths, p, new_tokens=int(lengths.max()), block_table=table)
    update_compressed_keys(k, *caches["flat"], lengths, p, new_tokens=int(lengths.max()))
    for _ in range(6):
        lengths = lengths + 1
        update_compressed_keys(kp, *caches["paged"], lengths, p, block_table=table)
        update_compressed_keys(k, *caches["flat"], lengths, p)
    for got, want in zip(caches["paged"], caches["flat"]):
        _assert_same(got, want, atol=1e-6, rtol=1e-6)
    for r, L in enumerate(ends):
        m1 = compressed_lengths(L, p)[0]
        _assert_same(caches["paged"][0][r, :m1], ref.compress_keys_ref(k[r:r + 1, :L], p.kernel_size,
                                                                       p.kernel_stride)[0], atol=1e-6, rtol=1e-6)
        assert torch.isnan(caches["paged"][0][r, m1:]).all()


# ------------------------------------------------------------------------------------------- attention
def _compressed(k, p):
    return compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)


# (params, length, Tq, G, D, query chunk): sparse queries only; a chunk crossing dense_positions whose Tq is not a
# multiple of the block; the released block size; several query chunks
ATTENTION_CASES = [(SMALL, 203, 37, 2, 32, None), (SMALL, 203, 150, 4, 32, None), (P64, 301, 120, 2, 64, None),
                   (BAND, 250, 61, 3, 32, 32)]


@pytest.mark.parametrize("p, L, Tq, G, D, chunk", ATTENTION_CASES)
def test_attention_paged_equals_contiguous(kernels, monkeypatch, p, L, Tq, G, D, chunk):
    """infllmv2_attention_paged == infllmv2_attention on the gathered keys, the second row of a pool whose rows
    share a prefix; with the kernels it reads K/V through the table (never gathers the context; the dense
    queries gather at most dense_positions keys) and equals the contiguous kernels (1e-6) and the reference."""
    BS = p.block_size
    k, v, kp, vp, table = paged_case([L + 2 * BS + 5, L], BS, D=D, seed=L + Tq, shared_blocks=2)
    q = torch.randn(1, Tq, 2 * G, D, generator=torch.Generator().manual_seed(Tq)).to(DEVICE)
    kc, vc = k[1:, :L], v[1:, :L]
    k1, k2 = _compressed(kc, p)
    if chunk is not None:
        monkeypatch.setattr(paged_mod, "_NO_GRAD_QUERY_CHUNK", chunk)
    ranges = []
    if kernels == "triton":
        monkeypatch.setattr(paged_mod, "gather_paged", lambda *a: pytest.fail("the Triton path gathered the context"))
        real_range = paged_mod.gather_paged_range
        monkeypatch.setattr(paged_mod, "gather_paged_range",
                            lambda pages, row, s, e: ranges.append(e - s) or real_range(pages, row, s, e))
    with torch.no_grad():
        got = infllmv2_attention_paged(q, kp, vp, table[1], L, k1, k2, p)
        want = infllmv2_attention(q, kc, vc, p, k1=k1, k2=k2)
    assert got.shape == q.shape and torch.isfinite(got).all()
    if kernels == "reference":
        _assert_same(got, want)
        return
    n_dense = min(max(p.dense_positions - (L - Tq), 0), Tq)
    assert ranges == ([L - Tq + n_dense] * 2 if n_dense else []) and all(n <= p.dense_positions for n in ranges)
    _assert_same(got, want, atol=1e-6, rtol=0)
    _mode(monkeypatch, "reference")
    torch.testing.assert_close(got, infllmv2_attention(q, kc, vc, p), atol=2e-5, rtol=1e-4)


def _two_row_case():
    """9 sparse queries at the end of each of two rows (BAND, pages of 16 keys, 3 shared) and their reference
    selection: (q flat [18, 4, 32], k, v, k_pages, v_pages, table, idx [2, 2, 9, 7], pos int32 [18], row [18])."""
    p, Tq = BAND, 9
    lengths = [134, 121]
    k, v, kp, vp, table = paged_case(lengths, 16, Hkv=2, D=32, seed=11, shared_blocks=3)
    q = torch.randn(2, Tq, 4, 32, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    idx = torch.cat([ref.select_blocks_ref(q[r:r + 1], *_compressed(k[r:r + 1, :L], p),
                                           (L - Tq + torch.arange(Tq, device=DEVICE))[None], p, 32 ** -0.5)
                     for r, L in enumerate(lengths)])
    pos = torch.cat([L - Tq + torch.arange(Tq, device=DEVICE) for L in lengths]).to(torch.int32)
    return q.reshape(2 * Tq, 4, 32), k, v, kp, vp, table, idx, pos, torch.arange(2, device=DEVICE).repeat_interleave(Tq)


@pytest.mark.parametrize("band, kpi, tile", [(False, 1, 1), (True, 2, 1), (True, 1, 1), (True, 1, 4)])
def test_sparse_forward_kernel_paged_equals_flat(monkeypatch, band, kpi, tile):
    """The forward kernels (band + per-token walk, band + union walk of 4 queries, walk alone) on two rows of one
    table (kbase = row offsets r * NB, ascending; a 16-query band tile holds both rows' 9 queries, the union tile
    of queries 8..11 both rows') equal the same kernels on the gathered contiguous cache (kbase = r * S): output
    and lse."""
    _mode(monkeypatch, "triton")
    from sala.ops.infllmv2 import triton_attention

    p, BS = BAND, 16
    qf, k, v, kp, vp, table, idx, pos, rows = _two_row_case()
    R, NB = table.shape
    S = NB * BS
    bands = (p.init_blocks, p.local_blocks) if band else None
    config = SparseKernelConfig(fwd_blocks_per_iter=kpi, fwd_query_tile=tile)
    o_p, lse_p = triton_attention.sparse_attention_fwd(qf, kp.view(-1, 2, 32), vp.view(-1, 2, 32), idx, pos,
                                                       rows * NB, BS, 32 ** -0.5, bands, config, block_table=table)
    o_f, lse_f = triton_attention.sparse_attention_fwd(qf, k.reshape(-1, 2, 32), v.reshape(-1, 2, 32), idx, pos,
                                                       rows * S, BS, 32 ** -0.5, bands, config)
    assert torch.isfinite(o_p).all() and torch.isfinite(lse_p).all()
    _assert_same(o_p, o_f, atol=1e-6, rtol=0)
    _assert_same(lse_p, lse_f, atol=1e-6, rtol=0)
    want = ref.sparse_attention_flat_ref(qf, k.reshape(-1, 2, 32), v.reshape(-1, 2, 32),
                                         idx.permute(0, 2, 1, 3).reshape(R * 9, 2, -1), pos.long(), rows * S, BS,
                                         32 ** -0.5)
    torch.testing.assert_close(o_p, want, atol=2e-5, rtol=1e-4)


def test_sparse_attention_flat_with_a_block_table(kernels):
    """sparse_attention_flat(block_table=...) (the flat API: kernels or reference) == the unpaged call on the
    gathered caches; it refuses autograd."""
    from sala.ops.infllmv2.sparse_attention import sparse_attention_flat

    p, BS = BAND, 16
    qf, k, v, kp, vp, table, idx, pos, rows = _two_row_case()
    R, NB = table.shape
    S, nbk = NB * BS, NB
    g = torch.arange(R * nbk, device=DEVICE)
    with torch.no_grad():
        got = sparse_attention_flat(qf, kp.view(-1, 2, 32), vp.view(-1, 2, 32), idx, pos, rows * NB, None, None,
                                    None, 0, p, 32 ** -0.5, forced_blocks=True, block_table=table)
        want = sparse_attention_flat(qf, k.reshape(-1, 2, 32), v.reshape(-1, 2, 32), idx, pos, rows * S,
                                     rows * nbk, g // nbk * S + g % nbk * BS, (g % nbk).to(torch.int32), R * nbk, p,
                                     32 ** -0.5, forced_blocks=True)
    assert torch.isfinite(got).all()
    _assert_same(got, want, **({} if kernels == "reference" else dict(atol=1e-6, rtol=0)))
    with pytest.raises(ValueError, match="inference only"):
        sparse_attention_flat(qf.clone().requires_grad_(), kp.view(-1, 2, 32), vp.view(-1, 2, 32), idx, pos,
                              rows * NB, None, None, None, 0, p, 32 ** -0.5, block_table=table)


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("T, config", [(1, None), (3, None), (1, SparseKernelConfig(decode_min_programs=8))])
def test_decode_paged_equals_contiguous(kernels, T, config):
    """infllmv2_decode with a block table == on the gathered caches of capacity NB * BS (NaN past every length
    and in unowned blocks); T = queries_per_row, each query at its own length; a padded row (length 0, no pages)
    gives garbage nobody reads but must not disturb the others."""
    p, BS = SMALL, 16
    ends = [117, 85, 160]
    k, v, kp, vp, table = paged_case(ends, BS, D=32, seed=13 + T, shared_blocks=2)
    R, NB = table.shape
    n1, n2 = compressed_lengths(NB * BS, p)
    k1c = torch.full((R, n1, 2, 32), NAN, device=DEVICE)
    k2c = torch.full((R, n2, 2, 32), NAN, device=DEVICE)
    lengths = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
    update_compressed_keys(kp, k1c, k2c, lengths, p, new_tokens=NB * BS, block_table=table)
    q = torch.randn(R * T, 8, 32, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    seqlens = torch.tensor([n - T + j + 1 for n in ends for j in range(T)], dtype=torch.int32, device=DEVICE)
    kc, vc = gather_paged(kp, table, NB * BS), gather_paged(vp, table, NB * BS)
    _assert_same(kc, k)
    out = torch.full_like(q, NAN)
    got = infllmv2_decode(q, kp, vp, k1c, k2c, seqlens, p, kernel_config=config, queries_per_row=T,
                          block_table=table, out=out)
    want = infllmv2_decode(q, kc, vc, k1c, k2c, seqlens, p, kernel_config=config, queries_per_row=T)
    assert got is out and torch.isfinite(got).all()
    _assert_same(got, want, **({} if kernels == "reference" else dict(atol=1e-6, rtol=0)))
    # each query against the prefill op on its row's keys
    for i in range(R * T):
        r, L = i // T, int(seqlens[i])
        full = infllmv2_attention(q[i][None, None], k[r:r + 1, :L], v[r:r + 1, :L], p)[0, 0]
        torch.testing.assert_close(got[i], full, atol=2e-5, rtol=1e-4)


def test_decode_paged_padding_row_leaves_the_others_alone(kernels):
    """A padded batch row (length 1, its table all 0: it reads the scratch page, garbage nobody reads) next to real
    rows: their outputs are the same as without it."""
    p, BS = SMALL, 16
    k, v, kp, vp, table = paged_case([90, 70], BS, D=32, seed=21)
    R, NB = table.shape
    pad_table = torch.cat([table, torch.zeros(1, NB, dtype=torch.int32, device=DEVICE)])
    n1, n2 = compressed_lengths(NB * BS, p)
    k1c, k2c = torch.zeros(3, n1, 2, 32, device=DEVICE), torch.zeros(3, n2, 2, 32, device=DEVICE)
    lengths = torch.tensor([90, 70, 1], dtype=torch.int32, device=DEVICE)
    update_compressed_keys(kp, k1c, k2c, lengths, p, new_tokens=NB * BS, block_table=pad_table)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    with_pad = infllmv2_decode(q, kp, vp, k1c, k2c, lengths, p, block_table=pad_table)
    alone = infllmv2_decode(q[:2], kp, vp, k1c[:2], k2c[:2], lengths[:2], p, block_table=table)
    _assert_same(with_pad[:2], alone)


# -------------------------------------------------------------------------------------------- the flow
def test_engine_flow_chunked_prefill_then_decode(kernels):
    """What the engine does with one row: prefill chunks written with write_paged, compressed keys extended from
    gather_paged_range, attention of each chunk, then decode steps written with write_paged_positions; the same
    outputs as the contiguous flow (the prefill op on all keys so far)."""
    p, BS, D = SMALL, 16, 32
    g = torch.Generator().manual_seed(31)
    keys = torch.randn(1, 180, 2, D, generator=g).to(DEVICE)
    vals = torch.randn(1, 180, 2, D, generator=g).to(DEVICE)
    qs = torch.randn(1, 180, 4, D, generator=g).to(DEVICE)
    NB, P = 13, 20
    kp, vp = torch.full((P, BS, 2, D), NAN, device=DEVICE), torch.full((P, BS, 2, D), NAN, device=DEVICE)
    table = torch.zeros(1, NB, dtype=torch.int32, device=DEVICE)
    table[0, :12] = (1 + torch.randperm(P - 1, generator=torch.Generator().manual_seed(32))[:12]).to(DEVICE)
    n1c, n2c = compressed_lengths(NB * BS, p)
    k1c, k2c = torch.full((1, n1c, 2, D), NAN, device=DEVICE), torch.full((1, n2c, 2, D), NAN, device=DEVICE)
    start = 0
    with torch.no_grad():
        for end in (50, 77, 170):
            write_paged(kp, table[0], start, keys[0, start:end])
            write_paged(vp, table[0], start, vals[0, start:end])
            (o1, o2), (n1, n2) = compressed_lengths(start, p), compressed_lengths(end, p)
            for cache, kern, stride, lo, hi in ((k1c, p.kernel_size, p.kernel_stride, o1, n1),
                                                (k2c, p.k2_kernel, p.k2_stride, o2, n2)):
                if hi > lo:
                    span = gather_paged_range(kp, table[0], stride * lo, stride * (hi - 1) + kern)
                    cache[0, lo:hi] = compress_window_range(span, 0, hi - lo, kern, stride)[0]
            got = infllmv2_attention_paged(qs[:, start:end], kp, vp, table[0], end, k1c[:, :n1], k2c[:, :n2], p)
            want = infllmv2_attention(qs[:, start:end], keys[:, :end], vals[:, :end], p)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
            start = end
        for t in range(170, 176):
            pos = torch.tensor([[t]], device=DEVICE)
            write_paged_positions(kp, table, pos, keys[:, t:t + 1])
            write_paged_positions(vp, table, pos, vals[:, t:t + 1])
            lengths = (pos[:, 0] + 1).to(torch.int32)
            update_compressed_keys(kp, k1c, k2c, lengths, p, block_table=table)
            got = infllmv2_decode(qs[:, t], kp, vp, k1c, k2c, lengths, p, block_table=table)
            want = infllmv2_attention(qs[:, t:t + 1], keys[:, :t + 1], vals[:, :t + 1], p)[:, 0]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_refused():
    p = SMALL
    k, v, kp, vp, table = paged_case([40, 30], 16, seed=41)
    q = torch.randn(1, 4, 4, 32, device=DEVICE)
    k1, k2 = _compressed(k[:1, :40], p)
    with pytest.raises(ValueError, match="int32"):
        gather_paged(kp, table.long(), 10)
    with pytest.raises(ValueError, match=r"\[NB\] or \[R, NB\]"):
        gather_paged(kp, table[None], 10)
    with pytest.raises(ValueError, match=r"table_row must be \[NB\]"):
        infllmv2_attention_paged(q, kp, vp, table, 40, k1, k2, p)
    with pytest.raises(ValueError, match="block_table must be int32"):
        infllmv2_decode(q[0], kp, vp, k1, k2, torch.tensor([40] * 1, dtype=torch.int32, device=DEVICE), p,
                        block_table=table[:1].to(torch.int16))
    with pytest.raises(ValueError, match=r"block_table must be \[R, NB\]"):
        write_paged_positions(kp, table[0], torch.zeros(1, 1, dtype=torch.int64, device=DEVICE),
                              torch.zeros(1, 1, 2, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"x \(3, 2, 16\) must be \[T, Hkv, D\] = \(3, 2, 32\) for pages "
                                         r"\(\d+, 16, 2, 32\)"):
        write_paged(kp, table[0], 0, torch.zeros(3, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"v_pages \(\d+, 16, 2, 16\) must have the shape of k_pages "
                                         r"\(\d+, 16, 2, 32\)"):
        infllmv2_attention_paged(q, kp, vp[..., :16], table[0], 40, k1, k2, p)
    with pytest.raises(ValueError, match=r"page size must be params.block_size = 64"):
        infllmv2_attention_paged(q, kp, vp, table[0], 40, k1, k2, P64)
    with pytest.raises(ValueError, match="length 500 must be in"):
        infllmv2_attention_paged(q, kp, vp, table[0], 500, k1, k2, p)
    with pytest.raises(ValueError, match=r"q has 3 rows.*2 \(the cache rows\)"):
        infllmv2_decode(q[0, :3], kp, vp, k1, k2, torch.ones(3, dtype=torch.int32, device=DEVICE), p,
                        block_table=table)
    with pytest.raises(ValueError, match=r"k1_cache \(1, \d+, 2, 32\) must be \[2, S', Hkv, D\]"):
        infllmv2_decode(q[0, :2], kp, vp, k1, k2, torch.ones(2, dtype=torch.int32, device=DEVICE), p,
                        block_table=table)
    with pytest.raises(ValueError, match=r"cache_seqlens \(3,\) must be \[2\]"):
        update_compressed_keys(kp, k1.expand(2, -1, -1, -1), k2.expand(2, -1, -1, -1),
                               torch.ones(3, dtype=torch.int32, device=DEVICE), p, block_table=table)
    with pytest.raises(ValueError, match="keys 300..301 do not fit"):
        write_paged(kp, table[0], 300, torch.zeros(1, 2, 32, device=DEVICE))
    with pytest.raises(ValueError, match="keys 5..3"):
        gather_paged_range(kp, table[0], 5, 3)
    with pytest.raises(ValueError, match="cannot be viewed"):
        write_paged(kp.transpose(0, 1), table[0], 0, torch.zeros(1, 2, 32, device=DEVICE))


def test_paged_paths_refuse_autograd():
    p = SMALL
    k, v, kp, vp, table = paged_case([70], 16, seed=42)
    k1, k2 = _compressed(k[:, :70], p)
    q = torch.randn(1, 6, 4, 32, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        infllmv2_attention_paged(q, kp, vp, table[0], 70, k1, k2, p)
    with pytest.raises(ValueError, match="inference only"):
        infllmv2_decode(q[0, :1], kp, vp, k1, k2, torch.tensor([70], dtype=torch.int32, device=DEVICE), p,
                        block_table=table)
    with torch.no_grad():
        out = infllmv2_attention_paged(q, kp, vp, table[0], 70, k1, k2, p)
    assert torch.isfinite(out).all()
