"""Triton kernels of InfLLM-V2 stage-1 selection for prefill: pooled block scores, then the top-k."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.dispatch import interpreter_enabled
from sala.ops.infllmv2.params import DEFAULT_KERNEL_CONFIG, SparseKernelConfig, SparseParams
from sala.ops.infllmv2.triton_topk import topk_blocks_triton
from sala.ops.infllmv2.triton_utils import LOG2E, check_selection, k2_tile, launch_stages, pow2, select_nb


@triton.jit
def _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2: tl.constexpr, K2K: tl.constexpr,
                 K2S: tl.constexpr, MASKED: tl.constexpr):
    """One K2 tile (windows j0 .. j0 + BN2) of the online log2-sum-exp: (m, l) updated. The scale (> 0) is
    applied to the row maxima and fused with the subtraction (one FMA per score). MASKED: per-row visibility
    (-inf where window j is not complete at pos_row); unmasked tiles must be visible to every row."""
    j = j0 + tl.arange(0, BN2)
    kk = tl.load(k2base + j.to(tl.int64)[:, None] * s2t + d[None, :], mask=(j < n2)[:, None], other=0.0)
    qk = tl.dot(qv, tl.trans(kk))
    if MASKED:
        qk = tl.where((j[None, :] * K2S + (K2K - 1)) <= pos_row[:, None], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m, tl.max(qk, axis=1) * scale_log2)
        m_safe = m_new
    l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(tl.fma(qk, scale_log2, -m_safe[:, None])), axis=1)
    return m_new, l


@triton.jit
def _select_k2_lse(qv, k2base, s2t, pos_row, pos_min, pos_max, scale_log2, d, ROWS: tl.constexpr,
                   K2K: tl.constexpr, K2S: tl.constexpr, BN2: tl.constexpr):
    """Stage-1 selection, pass 1: log2-sum-exp [ROWS] of the query rows qv [ROWS, D] (positions pos_row) over the
    K2 windows they see, read from k2base + window * s2t (0 where none is visible). pos_min: the smallest position
    of the program's valid tokens. The tiles every row sees run in a first loop without masks, the rest (the last
    one or two for consecutive positions) in a second, masked loop that is not software-pipelined (no extra
    shared memory)."""
    n2 = tl.where(pos_max >= K2K - 1, (tl.maximum(pos_max - K2K + 1, 0)) // K2S + 1, 0)
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    n2_all = tl.where(pos_min >= K2K - 1, (tl.maximum(pos_min - K2K + 1, 0)) // K2S + 1, 0)
    full_end = (n2_all // BN2) * BN2
    for j0 in range(0, full_end, BN2):
        m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, False)
    for j0 in tl.range(full_end, n2, BN2, num_stages=1):
        m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, True)
    return tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)), 0.0)


@triton.jit
def _select_k1_pool_store(qv, lse, k1base, s1t, row_ok, pos_tok, pos_max, tok_ok, obase, n_cols, scale_log2, d,
                          BQ: tl.constexpr, GP: tl.constexpr, K1K: tl.constexpr, K1S: tl.constexpr,
                          BS: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr, INIT: tl.constexpr,
                          LOCAL: tl.constexpr, NB: tl.constexpr):
    """Stage-1 selection, pass 2: K1 probabilities (normalised by pass 1's lse), summed over the GP head slots of
    each of the BQ tokens, max-pooled into blocks, forced init/local blocks (+inf) and future blocks (-inf);
    stored at obase [BQ, 1] + block for tokens with tok_ok and blocks < n_cols. Padded rows get lse = +inf, so
    they add 0. Visibility depends on the token only (its G rows share a position), so the mask is applied to
    the [BQ, BN1] head sums instead of the [BQ * GP, BN1] probabilities (invisible windows may sum to +inf
    before the mask; the mask is a select, so nothing of them remains). Pooling: with R = 4 and HALO = 1 each
    block's windows by two register splits (no reduction), otherwise a max reduction; the halo window shifted
    one block by `tl.gather`."""
    BN1: tl.constexpr = NB * R
    qblk_tok = tl.where(pos_tok >= 0, pos_tok // BS, -1)
    qblk_max = tl.max(qblk_tok, axis=0)
    n1 = tl.where(pos_max >= K1K - 1, (tl.maximum(pos_max - K1K + 1, 0)) // K1S + 1, 0)
    lse_pad = tl.where(row_ok, lse, float("inf"))
    carry = tl.zeros([BQ], dtype=tl.float32)
    bi = tl.arange(0, NB)
    ci = tl.arange(0, R)
    for b0 in range(0, qblk_max + 1, NB):
        j = b0 * R + tl.arange(0, BN1)
        kk = tl.load(k1base + j.to(tl.int64)[:, None] * s1t + d[None, :], mask=(j < n1)[:, None], other=0.0)
        p = tl.exp2(tl.fma(tl.dot(qv, tl.trans(kk)), scale_log2, -lse_pad[:, None]))
        ps = tl.sum(tl.reshape(p, (BQ, GP, BN1)), axis=1)                       # [BQ, BN1]
        ps = tl.where((j[None, :] * K1S + (K1K - 1)) <= pos_tok[:, None], ps, 0.0)
        if R == 4 and HALO == 1:   # windows of a block by register splits, no reductions
            even, odd = tl.split(tl.reshape(ps, (BQ, NB, 2, 2)))                 # windows 0,2 and 1,3
            w0, w2 = tl.split(even)
            w1, w3 = tl.split(odd)
            tail = w3                                                            # [BQ, NB]
            m_in = tl.maximum(tl.maximum(w0, w1), tl.maximum(w2, w3))
        else:
            p3 = tl.reshape(ps, (BQ, NB, R))
            m_in = tl.max(p3, axis=2)                                           # [BQ, NB]
            tail = tl.max(tl.where(ci[None, None, :] >= R - HALO, p3, 0.0), axis=2)  # last HALO columns
        shifted = tl.gather(tail, tl.broadcast_to(tl.maximum(bi - 1, 0)[None, :], (BQ, NB)), axis=1)
        shifted = tl.where(bi[None, :] == 0, carry[:, None], shifted)
        pooled = tl.maximum(m_in, shifted)
        carry = tl.max(tl.where(bi[None, :] == NB - 1, tail, 0.0), axis=1)
        blk = b0 + bi
        own = (blk[None, :] >= qblk_tok[:, None] - LOCAL) & (blk[None, :] <= qblk_tok[:, None])
        pooled = tl.where((blk[None, :] < INIT) | own, float("inf"), pooled)
        pooled = tl.where(blk[None, :] > qblk_tok[:, None], float("-inf"), pooled)
        tl.store(obase + blk[None, :], pooled, mask=tok_ok[:, None] & (blk[None, :] < n_cols))


@triton.jit(do_not_specialize=["Tq", "n_cols", "spb", "sob", "soh", "sot"])
def _block_scores_kernel(q_ptr, k1_ptr, k2_ptr, pos_ptr, out_ptr,
                         Tq, n_cols, scale_log2,
                         sqb, sqt, sqh, s1b, s1t, s1h, s2b, s2t, s2h, spb, sob, soh, sot,
                         G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr,
                         K1K: tl.constexpr, K1S: tl.constexpr, K2K: tl.constexpr, K2S: tl.constexpr,
                         BS: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr,
                         INIT: tl.constexpr, LOCAL: tl.constexpr, BN2: tl.constexpr, NB: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    ROWS: tl.constexpr = BQ * GP
    rows = tl.arange(0, ROWS)
    g = rows % GP
    t_row = pid_t * BQ + rows // GP
    row_ok = (t_row < Tq) & (g < G)
    pos_row = tl.load(pos_ptr + b * spb + t_row, mask=t_row < Tq, other=-1)
    t_tok = pid_t * BQ + tl.arange(0, BQ)
    pos_tok = tl.load(pos_ptr + b * spb + t_tok, mask=t_tok < Tq, other=-1)
    pos_max = tl.max(pos_tok, axis=0)
    pos_min = tl.min(tl.where(t_tok < Tq, pos_tok, 2147483647), axis=0)
    d = tl.arange(0, D)
    qp = q_ptr + b.to(tl.int64) * sqb + t_row.to(tl.int64)[:, None] * sqt + (h * G + g)[:, None] * sqh + d[None, :]
    qv = tl.load(qp, mask=row_ok[:, None], other=0.0)

    lse = _select_k2_lse(qv, k2_ptr + b.to(tl.int64) * s2b + h * s2h, s2t, pos_row, pos_min, pos_max, scale_log2, d,
                         ROWS, K2K, K2S, BN2)
    obase = out_ptr + b.to(tl.int64) * sob + h * soh + t_tok.to(tl.int64)[:, None] * sot
    _select_k1_pool_store(qv, lse, k1_ptr + b.to(tl.int64) * s1b + h * s1h, s1t, row_ok, pos_tok, pos_max,
                          t_tok < Tq, obase, n_cols, scale_log2, d, BQ, GP, K1K, K1S, BS, R, HALO, INIT, LOCAL, NB)


def pooled_block_scores_triton(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, pos: torch.Tensor,
                               params: SparseParams, scale: float, n_blocks: int,
                               config: SparseKernelConfig = DEFAULT_KERNEL_CONFIG, *,
                               fill: bool = True) -> torch.Tensor:
    """Same contract as `pooled_block_scores_ref` (fp32 output); pos int32 [B, Tq].

    fill=False: columns after each query's own block (pos // block_size) may hold garbage instead of -inf (for
    `topk_blocks_triton` with `limits`, which never reads them; saves a full write of the buffer)."""
    B, Tq, Hq, D = q.shape
    Hkv = k1.shape[2]
    G = Hq // Hkv
    shape = (B, Hkv, Tq, n_blocks)
    out = (torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device) if fill
           else torch.empty(shape, dtype=torch.float32, device=q.device))
    if Tq == 0:
        return out
    r = params.block_size // params.kernel_stride
    halo = (params.kernel_size - 1) // params.kernel_stride
    check_selection(r, halo, D, scale)
    GP = pow2(G)
    if Tq == 1:
        BQ = 1
    else:
        rows = 16 if interpreter_enabled() else config.select_rows
        BQ = max(1, min(rows // GP, pow2(Tq)))
    if BQ * GP < 16:
        GP = 16 // BQ
    NB = select_nb(r, config.select_k1_tile)
    pos = pos.to(torch.int32).contiguous()
    grid = (triton.cdiv(Tq, BQ), Hkv, B)
    _block_scores_kernel[grid](q, k1, k2, pos, out, Tq, n_blocks, scale * LOG2E,
                               q.stride(0), q.stride(1), q.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
                               k2.stride(0), k2.stride(1), k2.stride(2), pos.stride(0),
                               out.stride(0), out.stride(1), out.stride(2),
                               G=G, GP=GP, BQ=BQ, D=D, K1K=params.kernel_size, K1S=params.kernel_stride,
                               K2K=params.k2_kernel, K2S=params.k2_stride, BS=params.block_size, R=r, HALO=halo,
                               INIT=params.init_blocks, LOCAL=params.local_blocks, BN2=k2_tile(),
                               NB=NB, num_warps=config.select_warps if BQ * GP >= 64 else 4,
                               **launch_stages(config.select_stages))
    return out


def select_blocks_triton(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, pos: torch.Tensor,
                         params: SparseParams, scale: float, config: SparseKernelConfig = DEFAULT_KERNEL_CONFIG, *,
                         pos_max: int | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
    """Block indices int32 [B, Hkv, Tq, total]; queries processed in chunks whose scores fit `chunk_bytes`
    (default config.select_chunk_bytes). Rows of more than config.topk_max_cols blocks take the two-round Triton
    top-k (tiles, then their candidates; `triton_topk._topk_wide`); same tie rule. pos_max: an
    upper bound of pos on the host (else taken from pos with one sync).
    """
    B, Tq = pos.shape
    Hkv = k1.shape[2]
    out = torch.empty(B, Hkv, Tq, params.total_blocks, dtype=torch.int32, device=q.device)
    if Tq == 0:
        return out
    if pos_max is None:
        pos_max = int(pos.max().item())
    n_blocks = pos_max // params.block_size + 1
    chunk_bytes = config.select_chunk_bytes if chunk_bytes is None else chunk_bytes
    chunk = max(16, chunk_bytes // (4 * B * Hkv * max(n_blocks, 1)))
    fused = n_blocks <= config.topk_max_cols
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        pooled = pooled_block_scores_triton(q[:, c0:c1], k1, k2, pos[:, c0:c1], params, scale, n_blocks, config,
                                            fill=not fused)
        if fused:   # only columns up to each query's own block were written
            lim = torch.div(pos[:, c0:c1], params.block_size, rounding_mode="floor").to(torch.int32) + 1
            out[:, :, c0:c1] = topk_blocks_triton(pooled, params.total_blocks, limits=lim,
                                                  max_cols=config.topk_max_cols)
        else:       # every column written (-inf past each query's own block)
            out[:, :, c0:c1] = topk_blocks_triton(pooled, params.total_blocks, max_cols=config.topk_max_cols)
    return out
