"""Triton kernels of InfLLM-V2 block-sparse attention: forward, backward and the autograd Function."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.dispatch import interpreter_enabled
from sala.ops.infllmv2.params import DEFAULT_KERNEL_CONFIG, SparseKernelConfig
from sala.ops.infllmv2.triton_utils import LOG2E, launch_stages, online_softmax, pow2

_BIG_I32 = tl.constexpr(1 << 30)           # "no row" sentinels of the band kernel's min-reductions
_BIG_I64 = tl.constexpr(1 << 62)


def _kpi(K: int, config: SparseKernelConfig) -> int:
    """Selected blocks per iteration of the per-token walks (1 where K is not a multiple of the setting)."""
    kpi = config.fwd_blocks_per_iter
    return kpi if K % kpi == 0 else 1


@triton.jit
def _selected_keys(ibase, kk, c, pos, kb, h, d, skn, skh, blk_lo, blk_hi, K: tl.constexpr, BS: tl.constexpr,
                   table_ptr=None, PAGED: tl.constexpr = False):
    """Keys of selected-block slots kk.. (len(c) // BS blocks) of one query at position pos: the key mask [len(c)]
    (slot < K, blk_lo <= block < blk_hi, causal) and the K/V element offsets [len(c), D] of kv head h (rows
    kb + key; PAGED: rows table[kb + block] * BS + key % BS, kb the query's row offset in the flat table)."""
    slot = kk + c // BS
    blk = tl.load(ibase + slot, mask=slot < K, other=-1)
    key = blk * BS + c % BS
    kmask = (key <= pos) & (blk >= blk_lo) & (blk < blk_hi)
    if PAGED:
        page = tl.load(table_ptr + kb + blk, mask=kmask, other=0)
        rowp = (page.to(tl.int64) * BS + c % BS)[:, None]
    else:
        rowp = (kb + key.to(tl.int64))[:, None]
    return kmask, rowp * skn + h * skh + d[None, :]


@triton.jit
def _walk_bounds(pos, BS: tl.constexpr, BAND: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Blocks [lo, hi) a per-token walk may take for a query at pos: all up to its own block, or with BAND only
    those outside the forced ones (init blocks and the local band qb - LOCAL .. qb)."""
    if BAND:
        return INIT, pos // BS - LOCAL
    return 0, pos // BS + 1


@triton.jit
def _dq_block(qv, dov, kt, vt, lse, delta, mask, scale_log2):
    """Unscaled dq of one key tile: p = exp2(q.k * scale_log2 - lse) where mask, ds = p * (do.v - delta), ds.k."""
    s = tl.dot(qv, tl.trans(kt)) * scale_log2
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(dov, tl.trans(vt)) - delta[:, None])
    return tl.dot(ds.to(kt.dtype), kt)


@triton.jit(do_not_specialize=["Tq", "sib", "sih"])
def _sparse_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, pos_ptr, kbase_ptr, table_ptr,
                       Tq, scale_log2,
                       sqn, sqh, skn, skh, son, soh, sln, sib, sih, sit,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, K: tl.constexpr,
                       KPI: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, BAND: tl.constexpr = False,
                       INIT: tl.constexpr = 0, LOCAL: tl.constexpr = 0, PAGED: tl.constexpr = False):
    """Selected-block slots K0..K1 (of K), KPI blocks (KPI * BS keys) per iteration. BAND: o/lse already hold the
    forced blocks (init and the local band, `_sparse_band_fwd_kernel`); the slots hold every other selected block
    (forced ones are skipped by block number) and are merged into that state. PAGED: K/V are pages of BS keys,
    kbase the query's row offset in the flat block table at table_ptr (unread otherwise)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GP)
    row_ok = g < G
    d = tl.arange(0, D)
    c = tl.arange(0, KPI * BS)
    pos = tl.load(pos_ptr + i)
    kb = tl.load(kbase_ptr + i).to(tl.int64)
    i64 = i.to(tl.int64)
    ibase = idx_ptr + (i // Tq).to(tl.int64) * sib + h * sih + (i % Tq).to(tl.int64) * sit
    qv = tl.load(q_ptr + i64 * sqn + (h * G + g)[:, None] * sqh + d[None, :], mask=row_ok[:, None], other=0.0)
    orow = o_ptr + i64 * son + (h * G + g)[:, None] * soh + d[None, :]
    lrow = lse_ptr + i64 * sln + h * G + g
    if BAND:
        # the band's normalised output with m = its lse and l = 1 is the same running state (2^m * acc)
        m = tl.load(lrow, mask=row_ok, other=float("-inf"))
        has = m > float("-inf")
        l = tl.where(has, 1.0, 0.0)
        acc = tl.where(has[:, None], tl.load(orow, mask=row_ok[:, None], other=0.0).to(tl.float32), 0.0)
    else:
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
    blk_lo, blk_hi = _walk_bounds(pos, BS, BAND, INIT, LOCAL)
    for kk in range(K0, K1, KPI):
        kmask, kvp = _selected_keys(ibase, kk, c, pos, kb, h, d, skn, skh, blk_lo, blk_hi, K, BS, table_ptr, PAGED)
        kt = tl.load(k_ptr + kvp, mask=kmask[:, None], other=0.0)
        s = tl.where(kmask[None, :], tl.dot(qv, tl.trans(kt)) * scale_log2, float("-inf"))
        m, alpha, p, l = online_softmax(s, m, l)
        vt = tl.load(v_ptr + kvp, mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    tl.store(orow, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lrow, m + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _band_tile(pos_ptr, kbase_ptr, N, BM: tl.constexpr, BS: tl.constexpr, LOCAL: tl.constexpr):
    """Rows of band program tl.program_id(0): BM consecutive flat queries -> (token ids int64, in-range mask,
    positions, key bases, own blocks qb, first band blocks max(qb - LOCAL, 0))."""
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    inb = tok < N
    pos = tl.load(pos_ptr + tok, mask=inb, other=0)
    kbr = tl.load(kbase_ptr + tok, mask=inb, other=0).to(tl.int64)
    qb = pos // BS
    return tok.to(tl.int64), inb, pos, kbr, qb, tl.maximum(qb - LOCAL, 0)


@triton.jit
def _next_kbase(inb, kbr, cur):
    """The smallest key base above cur among the tile's rows (_BIG_I64 when none: the pass loop ends)."""
    return tl.min(tl.where(inb & (kbr > cur), kbr, _BIG_I64), axis=0)


@triton.jit
def _band_pass(inb, kbr, cur, pos, qb, lo):
    """Rows of key base cur, their largest position, and the block range min(lo) .. max(qb) they walk."""
    rows = inb & (kbr == cur)
    return (rows, tl.max(tl.where(rows, pos, -1), axis=0), tl.min(tl.where(rows, lo, _BIG_I32), axis=0),
            tl.max(tl.where(rows, qb, -1), axis=0))


@triton.jit
def _band_keys(kb, c, d, kbase, h, skn, skh, pmax, BS: tl.constexpr, table_ptr=None, PAGED: tl.constexpr = False):
    """Key block kb (BS keys from kbase + kb * BS) of kv head h: positions [BS], K/V offsets [BS, D], load mask.
    PAGED: the block is page table[kbase + kb] (kbase a row offset in the flat table; one load, none past pmax)."""
    key = kb * BS + c
    if PAGED:
        page = tl.load(table_ptr + kbase + kb, mask=kb * BS <= pmax, other=0)
        row = page.to(tl.int64) * BS + c
    else:
        row = kbase + key.to(tl.int64)
    return key, row[:, None] * skn + h * skh + d[None, :], key <= pmax


@triton.jit
def _band_step(qv, m, l, acc, k_ptr, v_ptr, kb, c, d, kbase, h, skn, skh, pos, rows, pmax, scale_log2,
               BS: tl.constexpr, table_ptr=None, PAGED: tl.constexpr = False):
    """One key block kb of the online softmax of the rows `rows` at positions pos."""
    key, kvp, kin = _band_keys(kb, c, d, kbase, h, skn, skh, pmax, BS, table_ptr, PAGED)
    kt = tl.load(k_ptr + kvp, mask=kin[:, None], other=0.0)
    s = tl.dot(qv, tl.trans(kt)) * scale_log2
    s = tl.where(rows[:, None] & (key[None, :] <= pos[:, None]), s, float("-inf"))
    m, alpha, p, l = online_softmax(s, m, l)
    vt = tl.load(v_ptr + kvp, mask=kin[:, None], other=0.0)
    return m, l, acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)


@triton.jit(do_not_specialize=["N"])
def _sparse_band_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pos_ptr, kbase_ptr, table_ptr, N, scale_log2,
                            sqn, sqh, skn, skh, son, soh, sln,
                            G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr,
                            INIT: tl.constexpr, LOCAL: tl.constexpr, PAGED: tl.constexpr = False):
    """The forced blocks of BM consecutive flat queries x one query head: init blocks below each row's band, then
    the band (blocks qb - LOCAL .. qb, causal). Rows of different key bases (documents, batch rows) are walked in
    one pass per key base (kbase ascending). Writes o and lse (log2) of the forced blocks alone. PAGED: K/V are
    pages, kbase row offsets in the flat block table at table_ptr (unread otherwise)."""
    hq = tl.program_id(1)
    h = hq // G
    d = tl.arange(0, D)
    c = tl.arange(0, BS)
    tok64, inb, pos, kbr, qb, lo = _band_tile(pos_ptr, kbase_ptr, N, BM, BS, LOCAL)
    qv = tl.load(q_ptr + tok64[:, None] * sqn + hq * sqh + d[None, :], mask=inb[:, None], other=0.0)
    cur = _next_kbase(inb, kbr, -1)
    last = tl.max(tl.where(inb, kbr, -1), axis=0)
    while cur <= last:
        rows, pmax, blo, bhi = _band_pass(inb, kbr, cur, pos, qb, lo)
        m = tl.full([BM], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        for b in tl.static_range(INIT):
            m, l, acc = _band_step(qv, m, l, acc, k_ptr, v_ptr, b, c, d, cur, h, skn, skh, pos, rows & (b < lo),
                                   pmax, scale_log2, BS, table_ptr, PAGED)
        for kb in range(blo, bhi + 1):
            m, l, acc = _band_step(qv, m, l, acc, k_ptr, v_ptr, kb, c, d, cur, h, skn, skh, pos, rows & (kb >= lo),
                                   pmax, scale_log2, BS, table_ptr, PAGED)
        l_safe = tl.where(l > 0, l, 1.0)
        tl.store(o_ptr + tok64[:, None] * son + hq * soh + d[None, :],
                 (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
                 mask=rows[:, None])
        tl.store(lse_ptr + tok64 * sln + hq, m + tl.log2(l_safe), mask=rows)
        cur = _next_kbase(inb, kbr, cur)


@triton.jit
def _union_next(sv, last, rank):
    """One step of the union walk's M-way merge. sv [M, KP]: each query's free selected blocks (_BIG_I32 where a
    slot holds none), last [M]: the block each query took last (-1 at first), rank [M]: the order of its key
    base in the tile. -> (cur [M]: each query's smallest block above last, _BIG_I32 when it has none left;
    key [M] int64: rank * 2^32 + cur, _BIG_I64 when none; nxt: the smallest key, the next (key base, block))."""
    cur = tl.min(tl.where(sv > last[:, None], sv, _BIG_I32), axis=1)
    key = tl.where(cur < _BIG_I32, rank.to(tl.int64) * 4294967296 + cur, _BIG_I64)
    return cur, key, tl.min(key, axis=0)


@triton.jit
def _union_size(sv, rank, S: tl.constexpr):
    """The number of distinct (key base rank, block) pairs among the free blocks sv [M, KP] (S = M * KP): the
    union walk's steps, by one sort of the pairs and a count of the first of each run."""
    keys = tl.where(sv < _BIG_I32, rank[:, None].to(tl.int64) * 4294967296 + sv, _BIG_I64)
    x = tl.sort(tl.reshape(keys, [S]))
    i = tl.arange(0, S)
    prev = tl.gather(x, tl.maximum(i - 1, 0), 0)
    return tl.sum(((x < _BIG_I64) & ((i == 0) | (x != prev))).to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["N", "Tq", "sib", "sih"])
def _sparse_union_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, pos_ptr, kbase_ptr, table_ptr,
                             N, Tq, scale_log2,
                             sqn, sqh, skn, skh, son, soh, sln, sib, sih, sit,
                             G: tl.constexpr, GP: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, KP: tl.constexpr,
                             INIT: tl.constexpr, LOCAL: tl.constexpr, PAGED: tl.constexpr = False):
    """The union walk: the free selected blocks (slots K0..K1, neither init nor in the local band) of M
    consecutive flat queries x kv head h (M * GP rows: query j's G heads in rows j * GP ..), merged into the band's
    softmax state that o/lse hold (as `_sparse_fwd_kernel` with BAND). Each (key base, block) that any of the M
    queries selected is loaded once and scored for all rows; rows whose query did not select it are masked.
    The order is an M-way merge of the queries' blocks by (key base, block): a query's blocks in ascending order,
    the same softmax steps as its per-token walk; queries of different key bases (documents, batch rows) in one
    tile never share a step. A slot list is read as a set (a block repeated in one row counts once). The number
    of steps (the union's size) is counted first (`_union_size`: a sort of the tile's M * KP slots), so the walk
    is a counted loop, which Triton software-pipelines (a while loop it would not). Rows of a step's
    non-selecting queries are masked (s = -inf: their state passes unchanged). PAGED as in
    `_sparse_fwd_kernel`."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    R: tl.constexpr = M * GP
    # the tile's queries: positions, key bases, free blocks
    jq = tl.arange(0, M)
    tok_q = t * M + jq
    q_in = tok_q < N
    pos_q = tl.load(pos_ptr + tok_q, mask=q_in, other=0)
    kb_q = tl.load(kbase_ptr + tok_q, mask=q_in, other=0).to(tl.int64)
    rank = tl.sum((kb_q[None, :] < kb_q[:, None]).to(tl.int32), axis=1)
    col = tl.arange(0, KP)
    sok = q_in[:, None] & (col[None, :] < K1 - K0)
    ibase = idx_ptr + (tok_q // Tq).to(tl.int64) * sib + h * sih + (tok_q % Tq).to(tl.int64) * sit
    blk = tl.load(ibase[:, None] + K0 + col[None, :], mask=sok, other=-1)
    hi = pos_q // BS - LOCAL                                  # blocks >= hi are the band's, < INIT the init ones
    sv = tl.where(sok & (blk >= INIT) & (blk < hi[:, None]), blk, _BIG_I32)
    steps = _union_size(sv, rank, M * KP)
    # the tile's rows and the band's state
    r = tl.arange(0, R)
    jr = r // GP
    g = r % GP
    tok_r = t * M + jr
    r_in = tok_r < N
    row_ok = (g < G) & r_in
    pos_r = tl.load(pos_ptr + tok_r, mask=r_in, other=0)
    tok64 = tok_r.to(tl.int64)
    d = tl.arange(0, D)
    c = tl.arange(0, BS)
    qv = tl.load(q_ptr + tok64[:, None] * sqn + (h * G + g)[:, None] * sqh + d[None, :], mask=row_ok[:, None],
                 other=0.0)
    orow = o_ptr + tok64[:, None] * son + (h * G + g)[:, None] * soh + d[None, :]
    lrow = lse_ptr + tok64 * sln + h * G + g
    m = tl.load(lrow, mask=row_ok, other=float("-inf"))
    has = m > float("-inf")
    l = tl.where(has, 1.0, 0.0)
    acc = tl.where(has[:, None], tl.load(orow, mask=row_ok[:, None], other=0.0).to(tl.float32), 0.0)
    of_query = jr[:, None] == jq[None, :]                      # [R, M]: row r belongs to query j
    last = tl.full([M], -1, dtype=tl.int32)
    cur, key, nxt = _union_next(sv, last, rank)
    for _ in range(0, steps):
        hit = (key == nxt) & (nxt < _BIG_I64)                  # the queries that selected this (key base, block)
        rows = tl.max(tl.where(of_query, hit[None, :].to(tl.int32), 0), axis=1) > 0
        # block b of key base kbn: a free block of the hit queries (b < qb - LOCAL), so all its keys exist and
        # precede them (no causal mask needed on the loads); masked only against a step past the union (none)
        b = (nxt % 4294967296).to(tl.int32)
        kbn = tl.max(tl.where(hit, kb_q, 0), axis=0)
        m, l, acc = _band_step(qv, m, l, acc, k_ptr, v_ptr, b, c, d, kbn, h, skn, skh, pos_r, rows,
                               tl.where(nxt < _BIG_I64, b * BS + BS, -1), scale_log2, BS, table_ptr, PAGED)
        last = tl.where(hit, cur, last)
        cur, key, nxt = _union_next(sv, last, rank)
    l_safe = tl.where(l > 0, l, 1.0)
    tl.store(orow, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lrow, m + tl.log2(l_safe), mask=row_ok)


@triton.jit(do_not_specialize=["Tq", "sib", "sih"])
def _sparse_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, pos_ptr, kbase_ptr,
                          Tq, scale_log2, scale,
                          sqn, sqh, skn, skh, sln, sib, sih, sit,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, K: tl.constexpr,
                          KPI: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, BAND: tl.constexpr = False,
                          INIT: tl.constexpr = 0, LOCAL: tl.constexpr = 0):
    """dq over selected-block slots K0..K1. BAND: dq already holds the forced blocks' part
    (`_sparse_band_bwd_dq_kernel`); only the other selected blocks are walked and added to it."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GP)
    row_ok = g < G
    d = tl.arange(0, D)
    c = tl.arange(0, KPI * BS)
    pos = tl.load(pos_ptr + i)
    kb = tl.load(kbase_ptr + i).to(tl.int64)
    i64 = i.to(tl.int64)
    ibase = idx_ptr + (i // Tq).to(tl.int64) * sib + h * sih + (i % Tq).to(tl.int64) * sit
    rows = i64 * sqn + (h * G + g)[:, None] * sqh + d[None, :]
    qv = tl.load(q_ptr + rows, mask=row_ok[:, None], other=0.0)
    dov = tl.load(do_ptr + rows, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + i64 * sln + h * G + g, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + i64 * sln + h * G + g, mask=row_ok, other=0.0)
    dq = tl.zeros([GP, D], dtype=tl.float32)
    blk_lo, blk_hi = _walk_bounds(pos, BS, BAND, INIT, LOCAL)
    for kk in range(K0, K1, KPI):
        kmask, kvp = _selected_keys(ibase, kk, c, pos, kb, h, d, skn, skh, blk_lo, blk_hi, K, BS)
        kt = tl.load(k_ptr + kvp, mask=kmask[:, None], other=0.0)
        vt = tl.load(v_ptr + kvp, mask=kmask[:, None], other=0.0)
        dq += _dq_block(qv, dov, kt, vt, lse, delta, kmask[None, :] & row_ok[:, None], scale_log2)
    dq = dq * scale
    if BAND:
        dq += tl.load(dq_ptr + rows, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptr + rows, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _band_dq_step(qv, dov, lse, delta, dq, k_ptr, v_ptr, kb, c, d, kbase, h, skn, skh, pos, rows, pmax, scale_log2,
                  BS: tl.constexpr):
    """dq (unscaled) of key block kb added for the rows `rows` at positions pos."""
    key, kvp, kin = _band_keys(kb, c, d, kbase, h, skn, skh, pmax, BS)
    kt = tl.load(k_ptr + kvp, mask=kin[:, None], other=0.0)
    vt = tl.load(v_ptr + kvp, mask=kin[:, None], other=0.0)
    return dq + _dq_block(qv, dov, kt, vt, lse, delta, rows[:, None] & (key[None, :] <= pos[:, None]), scale_log2)


@triton.jit(do_not_specialize=["N"])
def _sparse_band_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, pos_ptr, kbase_ptr, N,
                               scale_log2, scale, sqn, sqh, skn, skh, sln,
                               G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr,
                               INIT: tl.constexpr, LOCAL: tl.constexpr):
    """dq of the forced blocks (init + local band) for BM consecutive flat queries x one query head, with the
    final lse (log2) and delta = rowsum(do * o); the same tiling and per-key-base passes as the band forward."""
    hq = tl.program_id(1)
    h = hq // G
    d = tl.arange(0, D)
    c = tl.arange(0, BS)
    tok64, inb, pos, kbr, qb, lo = _band_tile(pos_ptr, kbase_ptr, N, BM, BS, LOCAL)
    roff = tok64[:, None] * sqn + hq * sqh + d[None, :]
    qv = tl.load(q_ptr + roff, mask=inb[:, None], other=0.0)
    dov = tl.load(do_ptr + roff, mask=inb[:, None], other=0.0)
    lse = tl.load(lse_ptr + tok64 * sln + hq, mask=inb, other=0.0)
    delta = tl.load(delta_ptr + tok64 * sln + hq, mask=inb, other=0.0)
    cur = _next_kbase(inb, kbr, -1)
    last = tl.max(tl.where(inb, kbr, -1), axis=0)
    while cur <= last:
        rows, pmax, blo, bhi = _band_pass(inb, kbr, cur, pos, qb, lo)
        dq = tl.zeros([BM, D], dtype=tl.float32)
        for b in tl.static_range(INIT):
            dq = _band_dq_step(qv, dov, lse, delta, dq, k_ptr, v_ptr, b, c, d, cur, h, skn, skh, pos,
                               rows & (b < lo), pmax, scale_log2, BS)
        for kb in range(blo, bhi + 1):
            dq = _band_dq_step(qv, dov, lse, delta, dq, k_ptr, v_ptr, kb, c, d, cur, h, skn, skh, pos,
                               rows & (kb >= lo), pmax, scale_log2, BS)
        tl.store(dq_ptr + roff, (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows[:, None])
        cur = _next_kbase(inb, kbr, cur)


@triton.jit(do_not_specialize=["n_gid", "Nk"])
def _sparse_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, pos_ptr,
                            seg_key_ptr, seg_start_ptr, seg_end_ptr, ent_q_ptr, gid_kstart_ptr, gid_blk_ptr,
                            n_gid, Nk, scale_log2, scale,
                            sqn, sqh, skn, skh, sln, sdkn, sdkh,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, QT: tl.constexpr):
    sid = tl.program_id(0)
    key_id = tl.load(seg_key_ptr + sid)
    if key_id >= 0:
        h = key_id // n_gid
        gid = key_id % n_gid
        start = tl.load(seg_start_ptr + sid)
        end = tl.load(seg_end_ptr + sid)
        ks = tl.load(gid_kstart_ptr + gid).to(tl.int64)
        blk = tl.load(gid_blk_ptr + gid)
        c = tl.arange(0, BS)
        d = tl.arange(0, D)
        kpos = blk * BS + c
        krow = ks + c.to(tl.int64)
        kin = krow < Nk
        kt = tl.load(k_ptr + krow[:, None] * skn + h * skh + d[None, :], mask=kin[:, None], other=0.0)
        vt = tl.load(v_ptr + krow[:, None] * skn + h * skh + d[None, :], mask=kin[:, None], other=0.0)
        dk = tl.zeros([BS, D], dtype=tl.float32)
        dv = tl.zeros([BS, D], dtype=tl.float32)
        ROWS: tl.constexpr = QT * GP
        r = tl.arange(0, ROWS)
        g = r % GP
        for e0 in range(start, end, QT):
            e = e0 + r // GP
            ok = (e < end) & (g < G)
            qi = tl.load(ent_q_ptr + e, mask=e < end, other=0).to(tl.int64)
            qpos = tl.load(pos_ptr + qi, mask=e < end, other=-1)
            rows = qi[:, None] * sqn + (h * G + g)[:, None] * sqh + d[None, :]
            qv = tl.load(q_ptr + rows, mask=ok[:, None], other=0.0)
            dov = tl.load(do_ptr + rows, mask=ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + qi * sln + h * G + g, mask=ok, other=0.0)
            delta = tl.load(delta_ptr + qi * sln + h * G + g, mask=ok, other=0.0)
            s = tl.dot(qv, tl.trans(kt)) * scale_log2                        # [ROWS, BS]
            mask = ok[:, None] & (kpos[None, :] <= qpos[:, None])
            p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(dov.dtype)), dov)
            dp = tl.dot(dov, tl.trans(vt))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(qv.dtype)), qv)
        optr = krow[:, None] * sdkn + h * sdkh + d[None, :]
        tl.atomic_add(dk_ptr + optr, dk * scale, mask=kin[:, None])
        tl.atomic_add(dv_ptr + optr, dv, mask=kin[:, None])


def _fwd_config(G: int) -> int:
    return max(16, pow2(G))


def _union_rows(G: int, M: int) -> int:
    """Rows per query of the union walk: G padded to a power of two, and to 16 // M (tl.dot needs 16 rows)."""
    return max(pow2(G), 16 // M)


def _band_slots(K: int, band: tuple[int, int] | None) -> tuple[int, int, dict]:
    """(first slot, end slot, extra constexprs) of the per-token walks: all K slots, or with band = (init, local)
    only init .. K - local - 1, where ascending indices keep every selected block that is not forced."""
    if band is None:
        return 0, K, {}
    init, local = band
    return init, max(init, K - local - 1), dict(BAND=True, INIT=init, LOCAL=local)


def _band_launch(rows: int, stages: int | None, dtype: torch.dtype) -> tuple[int, dict]:
    """(queries per band program, stage keywords): the configured values for 2-byte inputs; fp32 tiles take twice
    the shared memory, so they get half the rows and at most 2 stages (the configured ones need more than an
    H100's 227 KiB at head dim 128). 16 rows in the interpreter."""
    if interpreter_enabled():
        return 16, launch_stages(stages)
    if dtype.itemsize > 2:
        return max(16, rows // 2), launch_stages(min(stages, 2) if stages is not None else None)
    return rows, launch_stages(stages)


def sparse_attention_fwd(q, k, v, block_idx, pos, kbase, block_size, scale, band: tuple[int, int] | None = None,
                         config: SparseKernelConfig = DEFAULT_KERNEL_CONFIG, block_table=None):
    """q [N, Hq, D] flat queries (N = B*Tq of block_idx [B, Hkv, Tq, K]); k, v [Nk, Hkv, D] -> (o, lse log2).

    band = (init_blocks, local_blocks): block_idx comes from the selection with these forced blocks (init blocks
    and the local band qb - local .. qb are in every row). The forced blocks then run as dense query tiles
    (`_sparse_band_fwd_kernel`, K/V shared by config.band_rows queries) and a walk takes only the K - init -
    local - 1 other slots, merging into the band's softmax state: the union walk of config.fwd_query_tile = 4
    queries (`_sparse_union_fwd_kernel`, the default) or, with 1, the per-token kernel. Same result, less traffic.
    Requires kbase ascending along the flat queries (batch rows and documents in order).
    block_table int32 [R, NB] (contiguous): k, v are pages of block_size keys flattened to [P * block_size, Hkv,
    D], and kbase [N] is each query's row offset r * NB in the flat table; key t of row r is K/V row
    table[r, t // block_size] * block_size + t % block_size. Forward only (no backward reads pages)."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    B, _, Tq, K = block_idx.shape
    o = torch.empty_like(q)
    lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
    if N == 0:
        return o, lse
    k0, k1, extra = _band_slots(K, band)
    # unpaged: pos stands in for the table (never read; a None pointer would not compile in the helpers)
    table, paged = (pos, {}) if block_table is None else (block_table, dict(PAGED=True))
    if band is not None:
        bm, stages = _band_launch(config.band_rows, config.band_stages, q.dtype)
        _sparse_band_fwd_kernel[(triton.cdiv(N, bm), Hq)](
            q, k, v, o, lse, pos, kbase, table, N, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), o.stride(0), o.stride(1), lse.stride(0), G=G, D=D, BS=block_size, BM=bm, INIT=band[0],
            LOCAL=band[1], num_warps=config.band_warps, **stages, **paged)
        if k1 == k0:
            return o, lse
    if band is not None and config.fwd_query_tile > 1:
        M = config.fwd_query_tile
        _sparse_union_fwd_kernel[(triton.cdiv(N, M), Hkv)](
            q, k, v, o, lse, block_idx, pos, kbase, table, N, Tq, scale * LOG2E, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), o.stride(0), o.stride(1), lse.stride(0), block_idx.stride(0),
            block_idx.stride(1), block_idx.stride(2), G=G, GP=_union_rows(G, M), M=M, D=D, BS=block_size, K0=k0,
            K1=k1, KP=pow2(k1 - k0), INIT=band[0], LOCAL=band[1], num_warps=config.fwd_tile_warps,
            **launch_stages(config.fwd_tile_stages), **paged)
        return o, lse
    _sparse_fwd_kernel[(N, Hkv)](q, k, v, o, lse, block_idx, pos, kbase, table, Tq, scale * LOG2E,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
                                 lse.stride(0), block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
                                 G=G, GP=_fwd_config(G), D=D, BS=block_size, K=K, KPI=_kpi(K, config), K0=k0, K1=k1,
                                 num_warps=config.fwd_warps, **launch_stages(config.fwd_stages), **extra, **paged)
    return o, lse


def _invert_block_idx(block_idx, gbase, n_gid, seg_len):
    """CSR of queries per (kv head, global key block), cut into segments of <= seg_len queries (device only)."""
    B, H, Tq, K = block_idx.shape
    N = B * Tq
    dev = block_idx.device
    idx = block_idx.permute(1, 0, 2, 3).reshape(H, N, K).to(torch.int64)
    n_keys = H * n_gid
    key = torch.where(idx >= 0, torch.arange(H, device=dev)[:, None, None] * n_gid + gbase[None, :, None] + idx,
                      torch.full_like(idx, n_keys)).reshape(-1)
    sorted_key, order = torch.sort(key)
    ent_q = torch.div(order, K, rounding_mode="floor").remainder(N).to(torch.int32)
    ptr = torch.searchsorted(sorted_key, torch.arange(n_keys + 1, device=dev))
    counts = ptr[1:] - ptr[:-1]
    nseg = torch.div(counts + seg_len - 1, seg_len, rounding_mode="floor")
    seg_cum = torch.cumsum(nseg, 0)
    n_seg_bound = triton.cdiv(H * N * K, seg_len) + n_keys
    s = torch.arange(n_seg_bound, device=dev)
    seg_key = torch.searchsorted(seg_cum, s, right=True)
    valid = seg_key < n_keys
    kc = seg_key.clamp(max=n_keys - 1)
    first = seg_cum[kc] - nseg[kc]
    seg_start = ptr[kc] + (s - first) * seg_len
    seg_end = torch.minimum(seg_start + seg_len, ptr[kc + 1])
    seg_key = torch.where(valid, kc, torch.full_like(kc, -1))
    return (seg_key.to(torch.int32), seg_start.to(torch.int32), seg_end.to(torch.int32), ent_q, n_seg_bound)


def sparse_attention_bwd(do, q, k, v, o, lse, block_idx, pos, kbase, gbase, n_gid, gid_kstart, gid_blk,
                         block_size, scale, band: tuple[int, int] | None = None,
                         config: SparseKernelConfig = DEFAULT_KERNEL_CONFIG):
    """band = (init_blocks, local_blocks) as in `sparse_attention_fwd`: dq of the forced blocks by dense query
    tiles (`_sparse_band_bwd_dq_kernel`), the per-token dq walk over the other slots only. dk, dv unchanged."""
    N, Hq, D = q.shape
    Nk, Hkv, _ = k.shape
    G = Hq // Hkv
    B, _, Tq, K = block_idx.shape
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)                               # [N, Hq]
    dq = torch.empty_like(q)
    GP = _fwd_config(G)
    k0, k1, extra = _band_slots(K, band)
    if band is not None and N:
        bm, stages = _band_launch(config.band_dq_rows, config.band_dq_stages, q.dtype)
        _sparse_band_bwd_dq_kernel[(triton.cdiv(N, bm), Hq)](
            q, k, v, do, lse, delta, dq, pos, kbase, N, scale * LOG2E, scale, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), lse.stride(0), G=G, D=D, BS=block_size, BM=bm, INIT=band[0], LOCAL=band[1],
            num_warps=config.band_dq_warps, **stages)
    if k1 > k0 and N:
        _sparse_bwd_dq_kernel[(N, Hkv)](q, k, v, do, lse, delta, dq, block_idx, pos, kbase, Tq, scale * LOG2E,
                                        scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
                                        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
                                        G=G, GP=GP, D=D, BS=block_size, K=K, KPI=_kpi(K, config), K0=k0, K1=k1,
                                        num_warps=config.fwd_warps, **launch_stages(config.fwd_stages), **extra)
    dk, dv = _sparse_bwd_dkdv(do, q, k, v, lse, delta, block_idx, pos, gbase, n_gid, gid_kstart, gid_blk,
                              block_size, scale)
    return dq, dk, dv


def _sparse_bwd_dkdv(do, q, k, v, lse, delta, block_idx, pos, gbase, n_gid, gid_kstart, gid_blk, block_size,
                     scale):
    """dk, dv [Nk, Hkv, D] (k.dtype) by the KV-block-owned kernel over the inverted block indices."""
    N, Hq, D = q.shape
    Nk, Hkv, _ = k.shape
    G = Hq // Hkv
    dk = torch.zeros(Nk, Hkv, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    QT = max(1, 64 // pow2(G)) if not interpreter_enabled() else max(1, 16 // pow2(G))
    GPk = max(pow2(G), 16 // QT)
    seg_len = QT * (8 if interpreter_enabled() else 16)
    seg_key, seg_start, seg_end, ent_q, n_seg = _invert_block_idx(block_idx, gbase, n_gid, seg_len)
    _sparse_bwd_dkdv_kernel[(n_seg,)](q, k, v, do, lse, delta, dk, dv, pos, seg_key, seg_start, seg_end, ent_q,
                                      gid_kstart, gid_blk, n_gid, Nk, scale * LOG2E, scale,
                                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
                                      dk.stride(0), dk.stride(1),
                                      G=G, GP=GPk, D=D, BS=block_size, QT=QT, num_warps=4)
    return dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention on flat tokens; see `sparse_attention_fwd`. Selection is not differentiated."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, pos, kbase, gbase, gid_kstart, gid_blk, n_gid, block_size, scale,
                band=None, config=DEFAULT_KERNEL_CONFIG):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = sparse_attention_fwd(q, k, v, block_idx, pos, kbase, block_size, scale, band, config)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, pos, kbase, gbase, gid_kstart, gid_blk)
        ctx.meta = (n_gid, block_size, scale, band, config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_idx, pos, kbase, gbase, gid_kstart, gid_blk = ctx.saved_tensors
        n_gid, block_size, scale, band, config = ctx.meta
        dq, dk, dv = sparse_attention_bwd(do, q, k, v, o, lse, block_idx, pos, kbase, gbase, n_gid, gid_kstart,
                                          gid_blk, block_size, scale, band, config)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None
