"""Triton kernels of InfLLM-V2 decode: split-K attention over the selected blocks and split-N stage-1 selection."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.infllmv2.params import DEFAULT_KERNEL_CONFIG, SparseKernelConfig, SparseParams, compressed_lengths
from sala.ops.infllmv2.triton_topk import topk_blocks_triton
from sala.ops.infllmv2.triton_utils import LOG2E, check_selection, k2_tile, online_softmax, pow2, select_nb


@triton.jit
def _sparse_decode_splitk_kernel(q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, idx_ptr, pos_ptr, kbase_ptr, table_ptr,
                                 scale_log2, sqb, sqh, skn, skh, sib, sih, spb, sph, sps, spg, slb, slh, sls,
                                 K: tl.constexpr, BPS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                                 D: tl.constexpr, BS: tl.constexpr, PAGED: tl.constexpr = False):
    """Program (split, kv head, sequence): blocks [split*BPS, split*BPS + BPS) of the sequence's selection.
    PAGED: K/V are pages of BS keys, kbase the row offset in the flat block table at table_ptr (one load per
    block; unread otherwise)."""
    sp = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    g = tl.arange(0, GP)
    row_ok = g < G
    d = tl.arange(0, D)
    c = tl.arange(0, BS)
    pos = tl.load(pos_ptr + b)
    kb = tl.load(kbase_ptr + b).to(tl.int64)
    qv = tl.load(q_ptr + b.to(tl.int64) * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=row_ok[:, None],
                 other=0.0)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    ibase = idx_ptr + b.to(tl.int64) * sib + h * sih
    for j in range(BPS):
        kk = sp * BPS + j
        blk = tl.load(ibase + tl.minimum(kk, K - 1))
        blk = tl.where(kk < K, blk, -1)
        key = blk * BS + c
        kmask = (key >= 0) & (key <= pos)
        if PAGED:
            page = tl.load(table_ptr + kb + blk, mask=(blk >= 0) & (blk * BS <= pos), other=0)
            rowp = (page.to(tl.int64) * BS + c)[:, None]
        else:
            rowp = (kb + key.to(tl.int64))[:, None]
        kt = tl.load(k_ptr + rowp * skn + h * skh + d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.where(kmask[None, :], tl.dot(qv, tl.trans(kt)) * scale_log2, float("-inf"))
        m, alpha, p, l = online_softmax(s, m, l)
        vt = tl.load(v_ptr + rowp * skn + h * skh + d[None, :], mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    l_safe = tl.where(l > 0, l, 1.0)
    obase = po_ptr + b.to(tl.int64) * spb + h * sph + sp * sps
    tl.store(obase + g[:, None] * spg + d[None, :], acc / l_safe[:, None])
    tl.store(plse_ptr + b.to(tl.int64) * slb + h * slh + sp * sls + g,
             tl.where(l > 0, m + tl.log2(l_safe), float("-inf")))


@triton.jit
def _splitk_combine_kernel(po_ptr, plse_ptr, o_ptr, spb, sph, sps, spg, slb, slh, sls, sob, soh,
                           NSPLIT, G: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
    """Program (query head, sequence): merge the NSPLIT partial softmaxes of one row."""
    hq = tl.program_id(0)
    b = tl.program_id(1)
    h = hq // G
    g = hq % G
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    sm = s < NSPLIT
    lse = tl.load(plse_ptr + b.to(tl.int64) * slb + h * slh + s * sls + g, mask=sm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(sm, tl.exp2(lse - mx), 0.0)
    part = tl.load(po_ptr + b.to(tl.int64) * spb + h * sph + s[:, None] * sps + g * spg + d[None, :],
                   mask=sm[:, None], other=0.0)
    den = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * part, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + b.to(tl.int64) * sob + hq * soh + d, o.to(o_ptr.dtype.element_ty))


def decode_splits(B: int, Hkv: int, K: int, min_programs: int = DEFAULT_KERNEL_CONFIG.decode_min_programs
                  ) -> tuple[int, int]:
    """(splits, blocks per split) so that B * Hkv * splits >= min_programs when K allows."""
    want = max(1, -(-int(min_programs) // max(1, B * Hkv)))
    bps = max(1, -(-K // min(K, want)))
    return -(-K // bps), bps


def sparse_decode_splitk(q, k, v, block_idx, pos, kbase, block_size, scale,
                         config: SparseKernelConfig = DEFAULT_KERNEL_CONFIG, block_table=None):
    """Flash-decoding over selected blocks: q [B, Hq, D]; k, v [B*S, Hkv, D] flat caches; block_idx [B, Hkv, 1, K];
    pos int32 [B] (position of the new token); kbase int64 [B]. Returns o [B, Hq, D] in q.dtype.
    block_table int32 [R, NB] (contiguous): k, v are pages of block_size keys flattened to [P * block_size, Hkv,
    D] and kbase [B] is each query's row offset r * NB in the flat table."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    K = block_idx.shape[-1]
    GP = max(16, pow2(G))
    nsplit, bps = decode_splits(B, Hkv, K, config.decode_min_programs)
    po = torch.empty(B, Hkv, nsplit, GP, D, dtype=torch.float32, device=q.device)
    plse = torch.empty(B, Hkv, nsplit, GP, dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    if B == 0:
        return o
    table, paged = (pos, {}) if block_table is None else (block_table, dict(PAGED=True))   # pos: never read
    _sparse_decode_splitk_kernel[(nsplit, Hkv, B)](
        q, k, v, po, plse, block_idx, pos, kbase, table, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), block_idx.stride(0), block_idx.stride(1),
        po.stride(0), po.stride(1), po.stride(2), po.stride(3), plse.stride(0), plse.stride(1), plse.stride(2),
        K=K, BPS=bps, G=G, GP=GP, D=D, BS=block_size, num_warps=4, **paged)
    _splitk_combine_kernel[(Hq, B)](po, plse, o, po.stride(0), po.stride(1), po.stride(2), po.stride(3),
                                    plse.stride(0), plse.stride(1), plse.stride(2), o.stride(0), o.stride(1),
                                    nsplit, G=G, SP=max(2, pow2(nsplit)), D=D, num_warps=4)
    return o



@triton.jit
def _group_block_pool(p, carry, bi, ci, NB: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr):
    """Max-pool group-summed K1 probabilities p [NB * R] (one tile aligned to blocks) into blocks [NB].

    carry: max of the last HALO columns of the previous tile (0 at the start). Returns (pooled [NB], new carry)."""
    p3 = tl.reshape(p, (NB, R))
    m_in = tl.max(p3, axis=1)
    tail = tl.max(tl.where(ci[None, :] >= R - HALO, p3, 0.0), axis=1)
    shifted = tl.max(tl.where(bi[:, None] == bi[None, :] - 1, tail[:, None], 0.0), axis=0)
    shifted = tl.where(bi == 0, carry, shifted)
    new_carry = tl.max(tl.where(bi == NB - 1, tail, 0.0), axis=0)
    return tl.maximum(m_in, shifted), new_carry


@triton.jit(do_not_specialize=["cap2", "cps", "slb", "slh"])
def _decode_lse_split_kernel(q_ptr, k2_ptr, pos_ptr, plse_ptr, cap2, cps, scale_log2,
                             sqb, sqh, s2b, s2t, s2h, slb, slh, sls, qpr,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, K2K: tl.constexpr,
                             K2S: tl.constexpr, BN2: tl.constexpr):
    """Program (split, kv head, sequence): partial log2-sum-exp of the G heads over K2 columns
    [split*cps, split*cps + cps) that the new token sees (-inf when none). Query row b reads cache row b // qpr."""
    sp = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr + b)
    n2 = tl.where(pos >= K2K - 1, (tl.maximum(pos - K2K + 1, 0)) // K2S + 1, 0)
    n2 = tl.minimum(n2, cap2)
    qv = tl.load(q_ptr + b.to(tl.int64) * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None],
                 other=0.0)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    lo = sp * cps
    hi = tl.minimum(lo + cps, n2)
    k2base = k2_ptr + (b // qpr).to(tl.int64) * s2b + h * s2h
    for j0 in range(lo, hi, BN2):
        j = j0 + tl.arange(0, BN2)
        jm = j < hi
        kk = tl.load(k2base + j.to(tl.int64)[:, None] * s2t + d[None, :], mask=jm[:, None], other=0.0)
        s = tl.dot(qv, tl.trans(kk)) * scale_log2
        s = tl.where(jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(plse_ptr + b.to(tl.int64) * slb + h * slh + sp * sls + g,
             tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf")))


@triton.jit(do_not_specialize=["cap1", "n_cols", "nsplit2", "bps", "slb", "slh", "sob", "soh"])
def _decode_pool_split_kernel(q_ptr, k1_ptr, pos_ptr, plse_ptr, out_ptr, cap1, n_cols, nsplit2, bps, scale_log2,
                              sqb, sqh, s1b, s1t, s1h, slb, slh, sls, sob, soh, qpr,
                              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, K1K: tl.constexpr,
                              K1S: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr,
                              INIT: tl.constexpr, LOCAL: tl.constexpr, NB: tl.constexpr, SP2: tl.constexpr):
    """Program (split, kv head, sequence): pooled scores of blocks [split*bps, split*bps + bps) of the new token.

    Combines the partial K2 log-sum-exps of `_decode_lse_split_kernel`, then K1 pass + group sum + max-pool over
    its blocks (the halo of the block before the range is recomputed). Blocks after the own block keep the
    caller's -inf. Query row b reads cache row b // qpr."""
    sp = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    BN1: tl.constexpr = NB * R
    g = tl.arange(0, GP)
    row_ok = g < G
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr + b)
    qblk = pos // BS
    n1 = tl.where(pos >= K1K - 1, (tl.maximum(pos - K1K + 1, 0)) // K1S + 1, 0)
    n1 = tl.minimum(n1, cap1)
    b_lo = sp * bps
    b_hi = tl.minimum(tl.minimum(b_lo + bps, qblk + 1), n_cols)
    if b_lo < b_hi:
        s2 = tl.arange(0, SP2)
        pl = tl.load(plse_ptr + b.to(tl.int64) * slb + h * slh + s2[:, None] * sls + g[None, :],
                     mask=(s2 < nsplit2)[:, None], other=float("-inf"))
        mx = tl.max(pl, axis=0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.sum(tl.exp2(pl - mx_safe[None, :]), axis=0)
        lse = tl.where(tot > 0, mx_safe + tl.log2(tl.maximum(tot, 1e-30)), 0.0)
        qv = tl.load(q_ptr + b.to(tl.int64) * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=row_ok[:, None],
                     other=0.0)
        k1base = k1_ptr + (b // qpr).to(tl.int64) * s1b + h * s1h
        bi = tl.arange(0, NB)
        ci = tl.arange(0, R)
        # carry: the last HALO K1 columns before the range (the previous block's tail)
        j = b_lo * R - BN1 + tl.arange(0, BN1)
        jm = (j >= 0) & (j < n1)
        kk = tl.load(k1base + tl.maximum(j, 0).to(tl.int64)[:, None] * s1t + d[None, :], mask=jm[:, None], other=0.0)
        s = tl.dot(qv, tl.trans(kk)) * scale_log2
        p = tl.sum(tl.where(jm[None, :] & row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0), axis=0)
        carry = tl.max(tl.where(j >= b_lo * R - HALO, p, 0.0), axis=0)
        obase = out_ptr + b.to(tl.int64) * sob + h * soh
        for b0 in range(b_lo, b_hi, NB):
            j = b0 * R + tl.arange(0, BN1)
            jm = j < n1
            kk = tl.load(k1base + j.to(tl.int64)[:, None] * s1t + d[None, :], mask=jm[:, None], other=0.0)
            s = tl.dot(qv, tl.trans(kk)) * scale_log2
            p = tl.sum(tl.where(jm[None, :] & row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0), axis=0)
            pooled, carry = _group_block_pool(p, carry, bi, ci, NB, R, HALO)
            blk = b0 + bi
            forced = (blk < INIT) | ((blk >= qblk - LOCAL) & (blk <= qblk))
            pooled = tl.where(forced, float("inf"), pooled)
            pooled = tl.where(blk > qblk, float("-inf"), pooled)
            tl.store(obase + blk, pooled, mask=(blk < b_lo + bps) & (blk < n_cols))


def decode_select_splits(B: int, Hkv: int, n_items: int, unit: int,
                         min_programs: int = DEFAULT_KERNEL_CONFIG.decode_select_programs) -> tuple[int, int]:
    """(splits, items per split) over n_items (blocks or K2 columns) so that B * Hkv * splits >=
    min_programs when n_items allows; items per split a multiple of `unit`."""
    want = max(1, -(-int(min_programs) // max(1, B * Hkv)))
    n_units = max(1, -(-n_items // unit))
    per = -(-n_units // min(n_units, want)) * unit
    return max(1, -(-n_items // per)), per


def pooled_block_scores_decode_split(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, pos: torch.Tensor,
                                     params: SparseParams, scale: float, n_blocks: int,
                                     config: SparseKernelConfig = DEFAULT_KERNEL_CONFIG,
                                     queries_per_row: int = 1) -> torch.Tensor:
    """Decode stage 1 split over the compressed keys: q [B, Hq, D], k1/k2 caches [B / queries_per_row, S1|S2, Hkv,
    D] (query row b reads cache row b // queries_per_row), pos int32 [B] (position of the query) -> pooled block
    scores fp32 [B, Hkv, 1, n_blocks] (as `pooled_block_scores_ref`).

    Two launches, no host sync; grid sizes depend only on B, Hkv and the cache capacities."""
    B, Hq, D = q.shape
    Hkv = k1.shape[2]
    G = Hq // Hkv
    r = params.block_size // params.kernel_stride
    halo = (params.kernel_size - 1) // params.kernel_stride
    check_selection(r, halo, D, scale)
    out = torch.full((B, Hkv, 1, n_blocks), float("-inf"), dtype=torch.float32, device=q.device)
    if B == 0 or n_blocks == 0:
        return out
    GP = max(16, pow2(G))
    BN2 = k2_tile()
    nsplit2, cps = decode_select_splits(B, Hkv, max(1, k2.shape[1]), BN2, config.decode_select_programs)
    plse = torch.empty(B, Hkv, nsplit2, GP, dtype=torch.float32, device=q.device)
    pos = pos.to(torch.int32).contiguous()
    _decode_lse_split_kernel[(nsplit2, Hkv, B)](
        q, k2, pos, plse, k2.shape[1], cps, scale * LOG2E, q.stride(0), q.stride(1),
        k2.stride(0), k2.stride(1), k2.stride(2), plse.stride(0), plse.stride(1), plse.stride(2), queries_per_row,
        G=G, GP=GP, D=D, K2K=params.k2_kernel, K2S=params.k2_stride, BN2=BN2, num_warps=4)
    NB = select_nb(r, config.select_k1_tile)
    nsplit, bps = decode_select_splits(B, Hkv, n_blocks, NB, config.decode_select_programs)
    _decode_pool_split_kernel[(nsplit, Hkv, B)](
        q, k1, pos, plse, out, k1.shape[1], n_blocks, nsplit2, bps, scale * LOG2E, q.stride(0), q.stride(1),
        k1.stride(0), k1.stride(1), k1.stride(2), plse.stride(0), plse.stride(1), plse.stride(2),
        out.stride(0), out.stride(1), queries_per_row,
        G=G, GP=GP, D=D, K1K=params.kernel_size, K1S=params.kernel_stride, BS=params.block_size, R=r, HALO=halo,
        INIT=params.init_blocks, LOCAL=params.local_blocks, NB=NB, SP2=max(2, pow2(nsplit2)), num_warps=4)
    return out


def warmup_length_classes(max_tokens: int, params: SparseParams, *, batch: int = 1,
                          heads: tuple[int, int, int] = (32, 2, 128), device: str | torch.device = "cuda",
                          dtype: torch.dtype = torch.bfloat16, config: SparseKernelConfig | None = None) -> int:
    """Compile, on tiny inputs, the kernel variants whose Triton specialisation depends on the context length,
    for every context up to `max_tokens`: the top-k kernel per row-width class (powers of two up to
    `config.topk_max_cols`; prefill rows with per-query limits, decode rows without) and the split decode selection
    per cache-capacity class at this decode batch. Without it the first request at each new length class pays
    those compilations inside its latency. heads = (query heads, KV heads, head dim). Returns the launches made."""
    config = DEFAULT_KERNEL_CONFIG if config is None else config
    Hq, Hkv, D = heads
    K = params.total_blocks
    max_blocks = -(-int(max_tokens) // params.block_size) + 1
    launches = 0
    g = torch.Generator(device=device).manual_seed(0)
    nc = 16
    while nc <= min(config.topk_max_cols, max(16, pow2(max_blocks))):
        x = torch.rand(1, Hkv, 1, nc, device=device, generator=g)
        topk_blocks_triton(x, K, limits=torch.full((1, 1), nc - 1, dtype=torch.int32, device=device),
                           max_cols=config.topk_max_cols)
        topk_blocks_triton(torch.rand(batch, Hkv, 1, nc, device=device, generator=g), K, max_cols=config.topk_max_cols)
        launches += 2
        nc *= 2
    seen = set()
    cap = 256
    while cap < 2 * max_tokens:       # capacities double: every power-of-two class of decode splits is met
        n1, n2 = compressed_lengths(cap, params)
        sp2 = max(2, pow2(decode_select_splits(batch, Hkv, max(1, n2), k2_tile(), config.decode_select_programs)[0]))
        if sp2 not in seen:
            seen.add(sp2)
            q = torch.zeros(batch, Hq, D, device=device, dtype=dtype)
            k1 = torch.zeros(batch, max(1, n1), Hkv, D, device=device, dtype=dtype)
            k2 = torch.zeros(batch, max(1, n2), Hkv, D, device=device, dtype=dtype)
            pos = torch.full((batch,), cap - 1, dtype=torch.int32, device=device)
            pooled_block_scores_decode_split(q, k1, k2, pos, params, D ** -0.5, -(-cap // params.block_size), config)
            launches += 2
        cap *= 2
    return launches
