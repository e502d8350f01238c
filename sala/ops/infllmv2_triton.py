"""Triton kernels of InfLLM-V2 sparse attention (GPU; CPU under TRITON_INTERPRET=1).

Kernels (design notes in docs/sparse.md):
- `_compress_windows_kernel`: mean-pooled compressed keys; prefill (all windows) and the incremental form
  (windows completed by the last `new_tokens` keys, lengths read on the device: CUDA-graph friendly).
- `_block_scores_kernel`: fused stage 1 for a tile of BQ tokens x G heads of one KV head: K2 log-sum-exp pass,
  K1 pass summed over the group, max-pooling into blocks, forced/causal blocks. Writes pooled block scores
  [B, Hkv, chunk, n_blocks] for one query chunk (O(chunk * T / block_size) memory).
- `_topk_blocks_kernel`: the top-k blocks of each pooled row (radix select on order-preserving int32 images of
  the scores, ascending output by prefix sum, -1 padded); replaces torch.topk + sort for rows <= 4096 blocks.
  `_topk_blocks_compact_kernel` (opt-in, TUNING["topk_compact"]): the same result in a few passes (group-max
  lower bound, candidates sorted in registers), handing the rows it cannot do to the bisection kernel.
- `_sparse_fwd_kernel`: one query token x its G heads (rows, padded to >= 16) per program; online softmax over
  the selected blocks; causal inside the own block; flat (varlen) tokens with per-token position/key base.
- `_sparse_band_fwd_kernel` (default, TUNING["band_split"]): the forced blocks (init + local band, identical for
  all queries of a query block) as dense tiles of 128 flat queries x one query head; the per-token forward then
  walks only the other slots and merges into the band's (o, lse). `_sparse_band_bwd_dq_kernel` (opt-in,
  TUNING["band_split_dq"], default on): the same split for dq.
- `_sparse_bwd_dq_kernel`: the same walk for dq.
- `_sparse_fwd_tiled_kernel` / `_sparse_bwd_dq_tiled_kernel` (SALA_SPARSE_ATTN=tiled): a program owns TM
  consecutive flat query tokens x G heads of one KV head and walks the sorted union of the blocks its tokens
  selected (built on the device by `tile_block_union`), with a per-token membership bitmask per union entry
  and token-level causal masks per row.
- `_sparse_decode_splitk_kernel` + `_splitk_combine_kernel` (SALA_SPARSE_DECODE=splitk): flash-decoding; the
  selected blocks of one (sequence, KV head) are split over many programs whose partial softmaxes are merged.
- `_decode_lse_split_kernel` + `_decode_pool_split_kernel` (SALA_SPARSE_DECODE_SELECT=split): decode stage 1
  split over the compressed keys (partial K2 log-sum-exps per slice, merged by the K1 programs, each owning a
  range of blocks); grids fixed by batch, heads and cache capacity.
- `_compress_flat_kernel` + `_varlen_block_scores_kernel` (SALA_SPARSE_VARLEN=fused, sala/ops/infllmv2_varlen.py):
  compression and selection of all documents of a packed row in one launch each (per-window starts, per-tile
  document offsets).
- `_sparse_bwd_dkdv_kernel`: KV-block-owned: the block indices are inverted on the device into a CSR list of
  the queries that selected each (kv head, key block), cut into fixed-size segments; each program accumulates
  dk/dv of one block over one segment and adds it atomically (fp32). No host loop or sync.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from sala.ops.dispatch import interpreter_enabled
from sala.ops.infllmv2_reference import topk_block_indices

_LOG2E = 1.4426950408889634

# Widest rows (blocks) `topk_blocks_triton` takes by default (TUNING["topk_max_cols"]); wider rows go to
# torch.topk, which measured faster there (H200, bench/results/profile_selection*_h200.json: 6.5 vs 14.4 ms for
# all rows at 2048 columns, 583 vs 480 ms at 16384 with all 31 counting passes, before the early exit).
TOPK_MAX_COLS = 4096

# GPU launch settings (the interpreter uses small fixed tiles). Benchmarks may override them in process
# (`tuning(...)`).
TUNING = {
    "select_rows": 128,        # query rows (tokens x padded group heads) per selection program
    "select_k1_tile": 64,      # K1 columns per iteration (a multiple of block_size / kernel_stride)
    "select_warps": 8,
    "select_stages": 3,        # H200 sweep at 128K (bench/results/sparse_kernels_h200.json): 28.8 ms, default 29.0
    "select_chunk_bytes": 256 << 20,   # pooled-score buffer per query chunk (fp32). 1 GiB measured 5.6% faster
                                       # at 1M but took the peak to 2.03 GiB beyond the output (limit 2 GiB)
    "topk_early_exit": True,   # stop the top-k bisection once exactly K values reach the cut-off (H200, selection
                               # 21.7 vs 23.5 ms at 128K, 91.3 vs 95.9 at 256K: profile_selection_h200.json)
    "topk_max_cols": TOPK_MAX_COLS,  # widest rows for the top-k kernel; wider ones use torch.topk
    "topk_compact": False,   # top-k by group-max bound + candidate sort (few passes): measured slower on the H200
                             # (selection 33.7 vs 29.0 ms at 128K, 2248 vs 1912 ms at 1M: sparse_kernels_h200.json)
    "select_split_k2": True,   # K2 pass: unmasked loop over tiles all rows see, then a masked, unpipelined tail
    "select_mask_after_sum": True,  # K1 pass: visibility mask on the per-token head sums (16x fewer selects)
    "select_pool_gather": True,  # K1 pass: block max by register splits, halo shift by tl.gather (409 instead of
                                 # 592 SASS instructions per thread and tile; selection 21.7 vs 26.8 ms at 128K,
                                 # 1548 vs 1870 at 1M on the H200: profile_selection_h200.json)
    "select_branch_mask": False,  # visibility masks only on tiles some row does not see in full (a branch per tile
                                  # in one loop); needs Triton >= 3.9, so unmeasured on the H200 (Triton 3.6)
    "band_split": True,        # forced blocks (init + local band) as dense query tiles, the rest per token:
                               # attention 77.9 vs 96.5 ms at 128K on the H200 (sparse_kernels_h200.json, noband_*)
    "band_rows": 128,          # queries per band program (x one query head); the same sweep: 128 rows, 8 warps,
    "band_warps": 8,           # 3 stages 77.6 ms, 64 / 4 / 2 78.1 ms (within noise)
    "band_stages": 3,
    "band_split_dq": True,     # the same split for dq: forced blocks' dq by dense query tiles, the rest per token
    "band_dq_rows": 64,        # (H200, same run: whole fwd+bwd 311.9 vs 335.0 ms at 128K, 6-8% less 32K..256K)
    "band_dq_warps": 4,
    "band_dq_stages": 2,
    "fwd_warps": 4,
    "fwd_stages": 2,           # H200 sweep at 128K (bench/results/sparse_kernels_h200.json): 96 ms with 2 stages
    "fwd_blocks_per_iter": 2,  # and 2 blocks per iteration, 119 ms with Triton's default and 1 (forward and dq)
    "tiled_tokens": 8,         # query tokens per program of the tiled kernels (rows = tokens x 16 heads), <= 16
    "tiled_warps": 8,
    "tiled_stages": None,
    "decode_min_programs": 64,  # split-K decode: splits chosen so B * Hkv * splits >= this (when K allows)
    "decode_select_programs": 256,  # split-N decode selection: programs per launch >= this (when N allows)
}


@contextlib.contextmanager
def tuning(**values):
    """These TUNING values inside the block, the previous ones after it (unknown keys raise ValueError)."""
    unknown = sorted(set(values) - set(TUNING))
    if unknown:
        raise ValueError(f"unknown TUNING keys {unknown} (keys: {', '.join(sorted(TUNING))})")
    saved = {key: TUNING[key] for key in values}
    TUNING.update(values)
    try:
        yield
    finally:
        TUNING.update(saved)


def _kpi(K: int) -> int:
    kpi = TUNING["fwd_blocks_per_iter"]
    return kpi if K % kpi == 0 else 1


def _stages(key: str) -> dict:
    v = TUNING[key]
    return {} if v is None or interpreter_enabled() else {"num_stages": v}


# Triton 3.6 (the H200 machine's) fails in its software pipeliner on the branch-masked selection kernel
# (bench/results/gpu_tests_sparse_h200.log, 2026-12-02); 3.9 compiles it (tests/test_triton_sm90_compile.py).
BRANCH_MASK_MIN_TRITON = (3, 9)


def _triton_version() -> tuple[int, int]:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return major, minor


def _branch_mask() -> bool:
    """TUNING["select_branch_mask"], refused with a clear error where the installed Triton cannot compile it."""
    if not TUNING["select_branch_mask"]:
        return False
    if not interpreter_enabled() and _triton_version() < BRANCH_MASK_MIN_TRITON:
        raise RuntimeError(f"TUNING['select_branch_mask'] needs Triton >= {'.'.join(map(str, BRANCH_MASK_MIN_TRITON))} "
                           f"(Triton {triton.__version__}'s pipeliner fails on that kernel); set it to False")
    return True


def _check_selection(r: int, halo: int, D: int, scale: float) -> None:
    """What the stage-1 kernels need: r = block_size / kernel_stride a power of two, halo windows <= r, head_dim a
    power of two >= 16, and a positive softmax scale (they take row maxima of unscaled scores)."""
    if halo > r or r & (r - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"infllmv2 Triton selection needs block_size/kernel_stride a power of two ({r}), "
                         f"(kernel_size-1)//kernel_stride <= that ({halo}), head_dim a power of two >= 16 ({D})")
    if not scale > 0:
        raise ValueError(f"infllmv2 selection: the softmax scale must be > 0, got {scale}")


def _select_masks() -> dict:
    """The stage-1 kernel's constexprs from TUNING (select_split_k2, select_mask_after_sum, select_pool_gather);
    the branch variant takes the old path for the first two."""
    branch = bool(TUNING["select_branch_mask"])
    return dict(SPLIT_K2=bool(TUNING["select_split_k2"]) and not branch,
                MASK_AFTER_SUM=bool(TUNING["select_mask_after_sum"]) and not branch,
                POOL_GATHER=bool(TUNING["select_pool_gather"]))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------
# compression
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["new_tokens", "n_cap"])
def _compress_windows_kernel(k_ptr, out_ptr, len_ptr, new_tokens, n_cap,
                             skb, skt, skh, sob, sot, soh,
                             KERNEL: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    pid_j = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(len_ptr + b).to(tl.int32)
    old = tl.maximum(length - new_tokens, 0)
    n_new = tl.where(length >= KERNEL, (tl.maximum(length - KERNEL, 0)) // STRIDE + 1, 0)
    n_old = tl.where(old >= KERNEL, (tl.maximum(old - KERNEL, 0)) // STRIDE + 1, 0)
    j = n_old + pid_j * BJ + tl.arange(0, BJ)
    jm = (j < n_new) & (j < n_cap)
    d = tl.arange(0, D)
    acc = tl.zeros([BJ, D], dtype=tl.float32)
    base = k_ptr + b.to(tl.int64) * skb + h * skh
    for c in range(KERNEL):
        t = (j * STRIDE + c).to(tl.int64)
        acc += tl.load(base + t[:, None] * skt + d[None, :], mask=jm[:, None], other=0.0).to(tl.float32)
    acc = acc / KERNEL
    optr = out_ptr + b.to(tl.int64) * sob + h * soh + j.to(tl.int64)[:, None] * sot + d[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=jm[:, None])


def compress_windows(k: torch.Tensor, out: torch.Tensor, lengths: torch.Tensor, kernel: int, stride: int,
                     new_tokens: int) -> None:
    """Write windows [n(len - new_tokens), n(len)) of every sequence into `out` (k [B, S, H, D], out [B, n, H, D])."""
    B, S, H, D = k.shape
    if out.shape[1] == 0 or B == 0:
        return
    n_max = min(new_tokens // stride + 1, out.shape[1])
    BJ = 16 if n_max >= 16 else _pow2(n_max)
    grid = (triton.cdiv(n_max, BJ), H, B)
    _compress_windows_kernel[grid](k, out, lengths, new_tokens, out.shape[1],
                                   k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
                                   KERNEL=kernel, STRIDE=stride, D=D, BJ=BJ)


def compress_keys_triton(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    B, T, H, D = k.shape
    n = (T - kernel) // stride + 1 if T >= kernel else 0
    out = torch.empty(B, n, H, D, dtype=k.dtype, device=k.device)
    if n:
        lengths = torch.full((B,), T, dtype=torch.int32, device=k.device)
        compress_windows(k, out, lengths, kernel, stride, new_tokens=T)
    return out


def update_compressed_keys_triton(k_cache, k1_cache, k2_cache, cache_seqlens, params, new_tokens: int) -> None:
    compress_windows(k_cache, k1_cache, cache_seqlens, params.kernel_size, params.kernel_stride, new_tokens)
    compress_windows(k_cache, k2_cache, cache_seqlens, params.k2_kernel, params.k2_stride, new_tokens)


# ----------------------------------------------------------------------------------------------------------
# stage 1: pooled block scores
# ----------------------------------------------------------------------------------------------------------
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
                   K2K: tl.constexpr, K2S: tl.constexpr, BN2: tl.constexpr, BRANCH_MASK: tl.constexpr,
                   SPLIT: tl.constexpr):
    """Stage-1 selection, pass 1: log2-sum-exp [ROWS] of the query rows qv [ROWS, D] (positions pos_row) over the
    K2 windows they see, read from k2base + window * s2t (0 where none is visible). pos_min: the smallest position
    of the program's valid tokens. BRANCH_MASK: skip the visibility mask on tiles every row sees (a branch per
    tile). SPLIT: the tiles every row sees run in a first loop without masks, the rest (the last one or two for
    consecutive positions) in a second, masked loop that is not software-pipelined (no extra shared memory)."""
    n2 = tl.where(pos_max >= K2K - 1, (tl.maximum(pos_max - K2K + 1, 0)) // K2S + 1, 0)
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    if SPLIT:
        n2_all = tl.where(pos_min >= K2K - 1, (tl.maximum(pos_min - K2K + 1, 0)) // K2S + 1, 0)
        full_end = (n2_all // BN2) * BN2
        for j0 in range(0, full_end, BN2):
            m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, False)
        for j0 in tl.range(full_end, n2, BN2, num_stages=1):
            m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, True)
    elif BRANCH_MASK:   # visibility masks only on tiles some row does not see in full
        for j0 in range(0, n2, BN2):
            if (j0 + BN2 - 1) * K2S + K2K - 1 > pos_min:
                m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, True)
            else:
                m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, False)
    else:
        for j0 in range(0, n2, BN2):
            m, l = _k2_lse_tile(qv, k2base, s2t, j0, n2, pos_row, m, l, scale_log2, d, BN2, K2K, K2S, True)
    return tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)), 0.0)


@triton.jit
def _select_k1_pool_store(qv, lse, k1base, s1t, pos_row, row_ok, pos_tok, pos_min, pos_max, tok_ok, obase, n_cols,
                          scale_log2, d, BQ: tl.constexpr, GP: tl.constexpr, K1K: tl.constexpr, K1S: tl.constexpr,
                          BS: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr, INIT: tl.constexpr,
                          LOCAL: tl.constexpr, NB: tl.constexpr, BRANCH_MASK: tl.constexpr,
                          MASK_AFTER_SUM: tl.constexpr, POOL_GATHER: tl.constexpr = False):
    """Stage-1 selection, pass 2: K1 probabilities (normalised by pass 1's lse), summed over the GP head slots of
    each of the BQ tokens, max-pooled into blocks, forced init/local blocks (+inf) and future blocks (-inf);
    stored at obase [BQ, 1] + block for tokens with tok_ok and blocks < n_cols. BRANCH_MASK: tiles every row
    sees in full (up to pos_min) skip the visibility mask (padded rows get lse = +inf, so they add 0).
    MASK_AFTER_SUM: visibility depends on the token only (its G rows share a position), so the mask is applied
    to the [BQ, BN1] head sums instead of the [BQ * GP, BN1] probabilities (invisible windows may sum to +inf
    before the mask; the mask is a select, so nothing of them remains). POOL_GATHER: each block's R = 4 windows
    by two register splits (no reduction) and the halo window (HALO = 1) shifted one block by `tl.gather`
    (other R / HALO: the max reduction, still with the gather)."""
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
        if MASK_AFTER_SUM:
            p = tl.exp2(tl.fma(tl.dot(qv, tl.trans(kk)), scale_log2, -lse_pad[:, None]))
        elif BRANCH_MASK:   # the scale is applied inside each branch so that it fuses with the lse (one FMA)
            qk = tl.dot(qv, tl.trans(kk))
            if (b0 * R + BN1 - 1) * K1S + K1K - 1 <= pos_min:
                p = tl.exp2(tl.fma(qk, scale_log2, -lse_pad[:, None]))
            else:
                vis = ((j[None, :] * K1S + (K1K - 1)) <= pos_row[:, None]) & row_ok[:, None]
                p = tl.where(vis, tl.exp2(tl.fma(qk, scale_log2, -lse[:, None])), 0.0)
        else:
            s = tl.dot(qv, tl.trans(kk)) * scale_log2
            vis = ((j[None, :] * K1S + (K1K - 1)) <= pos_row[:, None]) & row_ok[:, None]
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        ps = tl.sum(tl.reshape(p, (BQ, GP, BN1)), axis=1)                       # [BQ, BN1]
        if MASK_AFTER_SUM:
            ps = tl.where((j[None, :] * K1S + (K1K - 1)) <= pos_tok[:, None], ps, 0.0)
        if POOL_GATHER and R == 4 and HALO == 1:   # windows of a block by register splits, no reductions
            even, odd = tl.split(tl.reshape(ps, (BQ, NB, 2, 2)))                 # windows 0,2 and 1,3
            w0, w2 = tl.split(even)
            w1, w3 = tl.split(odd)
            tail = w3                                                            # [BQ, NB]
            m_in = tl.maximum(tl.maximum(w0, w1), tl.maximum(w2, w3))
        else:
            p3 = tl.reshape(ps, (BQ, NB, R))
            m_in = tl.max(p3, axis=2)                                           # [BQ, NB]
            tail = tl.max(tl.where(ci[None, None, :] >= R - HALO, p3, 0.0), axis=2)  # last HALO columns
        if POOL_GATHER:
            shifted = tl.gather(tail, tl.broadcast_to(tl.maximum(bi - 1, 0)[None, :], (BQ, NB)), axis=1)
        else:
            shifted = tl.max(tl.where(bi[None, :, None] == bi[None, None, :] - 1, tail[:, :, None], 0.0), axis=1)
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
                         INIT: tl.constexpr, LOCAL: tl.constexpr, BN2: tl.constexpr, NB: tl.constexpr,
                         BRANCH_MASK: tl.constexpr, SPLIT_K2: tl.constexpr, MASK_AFTER_SUM: tl.constexpr,
                         POOL_GATHER: tl.constexpr = False):
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
                         ROWS, K2K, K2S, BN2, BRANCH_MASK, SPLIT_K2)
    obase = out_ptr + b.to(tl.int64) * sob + h * soh + t_tok.to(tl.int64)[:, None] * sot
    _select_k1_pool_store(qv, lse, k1_ptr + b.to(tl.int64) * s1b + h * s1h, s1t, pos_row, row_ok, pos_tok, pos_min,
                          pos_max, t_tok < Tq, obase, n_cols, scale_log2, d, BQ, GP, K1K, K1S, BS, R, HALO, INIT,
                          LOCAL, NB, BRANCH_MASK, MASK_AFTER_SUM, POOL_GATHER)


def pooled_block_scores_triton(q, k1, k2, pos, params, scale, n_blocks, *, fill: bool = True) -> torch.Tensor:
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
    _check_selection(r, halo, D, scale)
    GP = _pow2(G)
    if Tq == 1:
        BQ = 1
    else:
        rows = 16 if interpreter_enabled() else TUNING["select_rows"]
        BQ = max(1, min(rows // GP, _pow2(Tq)))
    if BQ * GP < 16:
        GP = 16 // BQ
    NB = max(16 // r, 2) if interpreter_enabled() else max(TUNING["select_k1_tile"] // r, 2)
    pos = pos.to(torch.int32).contiguous()
    grid = (triton.cdiv(Tq, BQ), Hkv, B)
    _block_scores_kernel[grid](q, k1, k2, pos, out, Tq, n_blocks, scale * _LOG2E,
                               q.stride(0), q.stride(1), q.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
                               k2.stride(0), k2.stride(1), k2.stride(2), pos.stride(0),
                               out.stride(0), out.stride(1), out.stride(2),
                               G=G, GP=GP, BQ=BQ, D=D, K1K=params.kernel_size, K1S=params.kernel_stride,
                               K2K=params.k2_kernel, K2S=params.k2_stride, BS=params.block_size, R=r, HALO=halo,
                               INIT=params.init_blocks, LOCAL=params.local_blocks, BN2=_k2_tile(),
                               NB=NB, BRANCH_MASK=_branch_mask(), **_select_masks(),
                               num_warps=TUNING["select_warps"] if BQ * GP >= 64 else 4, **_stages("select_stages"))
    return out


def select_blocks_triton(q, k1, k2, pos, params, scale, *, pos_max: int | None = None,
                         chunk_bytes: int | None = None) -> torch.Tensor:
    """Block indices int32 [B, Hkv, Tq, total]; queries processed in chunks whose scores fit `chunk_bytes`.

    pos_max: an upper bound of pos on the host (else taken from pos with one sync).
    """
    B, Tq = pos.shape
    Hkv = k1.shape[2]
    out = torch.empty(B, Hkv, Tq, params.total_blocks, dtype=torch.int32, device=q.device)
    if Tq == 0:
        return out
    if pos_max is None:
        pos_max = int(pos.max().item())
    n_blocks = pos_max // params.block_size + 1
    chunk_bytes = TUNING["select_chunk_bytes"] if chunk_bytes is None else chunk_bytes
    chunk = max(16, chunk_bytes // (4 * B * Hkv * max(n_blocks, 1)))
    fused = n_blocks <= topk_max_cols()
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        pooled = pooled_block_scores_triton(q[:, c0:c1], k1, k2, pos[:, c0:c1], params, scale, n_blocks,
                                            fill=not fused)
        if fused:   # only columns up to each query's own block were written
            lim = torch.div(pos[:, c0:c1], params.block_size, rounding_mode="floor").to(torch.int32) + 1
            out[:, :, c0:c1] = topk_blocks_triton(pooled, params.total_blocks, limits=lim)
        else:
            out[:, :, c0:c1] = topk_block_indices(pooled, params.total_blocks)
    return out


# ----------------------------------------------------------------------------------------------------------
# top-k of pooled block scores (radix select on the float bits, one program per row)
# ----------------------------------------------------------------------------------------------------------


# Opt-in (TUNING["topk_compact"], measured slower on the H200, hence off): rows up to TOPK_COMPACT_MAX_COLS go through
# `_topk_blocks_compact_kernel` (a handful of passes instead of 31), with the bisection kernel as its fallback.
TOPK_COMPACT_MAX_COLS = 32768
_NEG_INF_KEY = tl.constexpr(-2139095041)   # order-preserving int32 image of -inf (0xFF800000 ^ 0x7FFFFFFF)
_INF_KEY = tl.constexpr(2139095040)        # image of +inf (0x7F800000); NaN images are larger
_BIG_I32 = tl.constexpr(1 << 30)           # "no row" sentinels of the band kernel's min-reductions
_BIG_I64 = tl.constexpr(1 << 62)


@triton.jit
def _topk_row_keys(x_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, NC: tl.constexpr, HAS_LIM: tl.constexpr):
    """Order-preserving int32 images [NC] of row r's values (float bits, magnitude bits flipped for negatives);
    columns past the row's limit (or n_cols) read as -inf."""
    cols = tl.arange(0, NC)
    n = n_cols
    if HAS_LIM:
        b = r // (H * T)
        t = r % T
        n = tl.minimum(tl.load(lim_ptr + b.to(tl.int64) * slb + t.to(tl.int64) * slt), n_cols)
    x = tl.load(x_ptr + r.to(tl.int64) * sxr + cols, mask=cols < n, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _topk_store(out_ptr, r, sel, K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr):
    """Write the columns where sel [NC] is set, ascending, then -1 up to K, at out + r * K."""
    cols = tl.arange(0, NC)
    slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    obase = out_ptr + r.to(tl.int64) * K
    tl.store(obase + slot, cols, mask=sel)
    kk = tl.arange(0, KP)
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    tl.store(obase + kk, tl.full([KP], -1, tl.int32), mask=(kk >= n_sel) & (kk < K))


@triton.jit
def _topk_bisect_row(x_ptr, out_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt,
                     K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, HAS_LIM: tl.constexpr,
                     EARLY_EXIT: tl.constexpr = False):
    """Top-K of row r by bisection: the K-th largest image is found bit by bit (up to 31 counting passes over the
    row, held in registers); ties at the cut-off go to the lowest columns. EARLY_EXIT: stop at the first
    candidate cut-off that exactly K images reach (then "image >= cut-off" is the answer; on distinct values that
    happens once the bits of the K-th and (K+1)-th largest part, typically after 15-20 passes)."""
    key = _topk_row_keys(x_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, NC, HAS_LIM)
    valid = key > _NEG_INF_KEY
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    # the K-th largest image: sign first, then bits 30..0 (setting a bit raises a two's-complement value)
    n_nonneg = tl.sum((key >= 0).to(tl.int32), axis=0)
    thr = tl.where(n_nonneg >= K, 0, -2147483647 - 1)
    if EARLY_EXIT:
        bit = 30
        exact = n_nonneg == K
        while (bit >= 0) & (exact == 0):
            cand = thr | (1 << bit)
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= K, cand, thr)
            exact = cnt == K
            bit -= 1
    else:
        for i in tl.static_range(31):
            cand = thr | (1 << (30 - i))
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= K, cand, thr)
    above = key > thr
    need = K - tl.sum(above.to(tl.int32), axis=0)
    tie = key == thr
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    sel = tl.where(n_valid <= K, valid, sel)
    _topk_store(out_ptr, r, sel, K, KP, NC)


@triton.jit(do_not_specialize=["n_cols", "H", "T", "sxr", "slb", "slt"])
def _topk_blocks_kernel(x_ptr, out_ptr, lim_ptr, flag_ptr, n_cols, H, T, sxr, slb, slt,
                        K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, HAS_LIM: tl.constexpr,
                        HAS_FLAG: tl.constexpr, EARLY_EXIT: tl.constexpr = False):
    """Row r of x [R, n_cols] fp32 -> the column indices of its K largest values other than -inf, ascending,
    -1 padded, at out + r * K (`_topk_bisect_row`). With HAS_LIM, row r = (b, h, t) of [B, H, T] reads only
    its first lim[b, t] columns. With HAS_FLAG, only rows whose flag is set (by the compact kernel) run."""
    r = tl.program_id(0)
    if HAS_FLAG:
        if tl.load(flag_ptr + r) != 0:
            _topk_bisect_row(x_ptr, out_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, K, KP, NC, HAS_LIM,
                             EARLY_EXIT)
    else:
        _topk_bisect_row(x_ptr, out_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, K, KP, NC, HAS_LIM, EARLY_EXIT)


@triton.jit(do_not_specialize=["n_cols", "H", "T", "sxr", "slb", "slt"])
def _topk_blocks_compact_kernel(x_ptr, out_ptr, lim_ptr, scratch_ptr, flag_ptr, n_cols, H, T, sxr, slb, slt,
                                K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, NG: tl.constexpr,
                                CAP: tl.constexpr, HAS_LIM: tl.constexpr):
    """Top-K of row r in a few passes: +inf (and NaN) columns are taken first; among the K' = K - #inf finite
    values, the K'-th largest of NG group maxima bounds the cut-off from below (each of the top K' groups
    holds a value >= it), so only values >= that bound are candidates. Up to CAP candidates are packed
    (image << 32 | 2^31-1 - column) into scratch [R, CAP] int64, sorted descending in registers, and the K'-th
    gives the cut-off (ties: lowest columns, as the bisection kernel). Rows where this does not apply (more
    than CAP candidates, K' outside 1..NG) get flag[r] = 1 and are left to `_topk_blocks_kernel`."""
    r = tl.program_id(0)
    key = _topk_row_keys(x_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, NC, HAS_LIM)
    cols = tl.arange(0, NC)
    valid = key > _NEG_INF_KEY
    is_inf = key >= _INF_KEY
    finite = valid & (key < _INF_KEY)
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    kf = K - tl.sum(is_inf.to(tl.int32), axis=0)
    fkey = tl.where(finite, key, _NEG_INF_KEY)
    gmax = tl.max(tl.reshape(fkey, (NG, NC // NG)), axis=1)
    gs = tl.sort(gmax, descending=True)
    gi = tl.arange(0, NG)
    lb = tl.sum(tl.where(gi == kf - 1, gs, 0), axis=0)
    cand = finite & (key >= lb)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    if n_valid <= K:
        _topk_store(out_ptr, r, valid, K, KP, NC)
        tl.store(flag_ptr + r, 0)
    elif (kf >= 1) & (kf <= NG) & (n_cand <= CAP):
        slot = tl.cumsum(cand.to(tl.int32), axis=0) - 1
        packed = (key.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)
        sbase = scratch_ptr + r.to(tl.int64) * CAP
        tl.store(sbase + slot, packed, mask=cand)
        tl.debug_barrier()
        ci = tl.arange(0, CAP)
        c = tl.load(sbase + ci, mask=ci < n_cand, other=-9223372036854775807)
        cs = tl.sort(c, descending=True)
        thr = tl.sum(tl.where(ci == kf - 1, cs, 0), axis=0)
        thr_key = (thr >> 32).to(tl.int32)
        thr_col = 2147483647 - (thr & 0xFFFFFFFF).to(tl.int32)
        sel = is_inf | (finite & ((key > thr_key) | ((key == thr_key) & (cols <= thr_col))))
        _topk_store(out_ptr, r, sel, K, KP, NC)
        tl.store(flag_ptr + r, 0)
    else:
        tl.store(flag_ptr + r, 1)


def topk_blocks_triton(pooled: torch.Tensor, total_blocks: int, *, limits: torch.Tensor | None = None) -> torch.Tensor:
    """`topk_block_indices` in one kernel: pooled fp32 [..., n] -> int32 [..., total_blocks], ascending, -1 padded.

    limits: int32 [B, T] for pooled [B, H, T, n]: row (b, h, t) considers only its first limits[b, t] columns
    (the rest may be garbage). Rows longer than `topk_max_cols()` fall back to `topk_block_indices`.
    """
    return _topk_blocks(pooled, total_blocks, limits)[0]


def _topk_blocks(pooled: torch.Tensor, total_blocks: int,
                 limits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`topk_blocks_triton`, plus the per-row flags int32 [R] of the compact pass (1: the row was left to the
    bisection kernel) when TUNING["topk_compact"] is on, else None."""
    n = pooled.shape[-1]
    max_cols = topk_max_cols()
    if n > max_cols or pooled.dtype != torch.float32:
        if limits is not None:
            raise ValueError(f"topk_blocks_triton: limits need fp32 rows of <= {max_cols} columns, got "
                             f"{n} columns of {pooled.dtype}")
        return topk_block_indices(pooled, total_blocks), None
    lead = pooled.shape[:-1]
    out = torch.empty(*lead, total_blocks, dtype=torch.int32, device=pooled.device)
    x = pooled.reshape(-1, n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    R = x.shape[0]
    if R == 0:
        return out, None
    if limits is not None:
        if pooled.dim() != 4 or limits.shape != (pooled.shape[0], pooled.shape[2]):
            raise ValueError(f"topk_blocks_triton: limits {tuple(limits.shape)} must be [B, T] of pooled "
                             f"[B, H, T, n] {tuple(pooled.shape)}")
        H, T, lim = pooled.shape[1], pooled.shape[2], limits.to(torch.int32)
        slb, slt = lim.stride(0), lim.stride(1)
    else:
        H, T, lim, slb, slt = 1, 1, x, 0, 0
    NC = max(16, _pow2(n))
    KP = max(16, _pow2(total_blocks))
    warps = 4 if NC <= 2048 else (8 if NC <= 8192 else 16)
    flag = None
    if TUNING["topk_compact"]:
        NG = max(16, min(256, NC // 16))
        CAP = max(64, _pow2(4 * total_blocks))
        flag = torch.empty(R, dtype=torch.int32, device=pooled.device)
        scratch = torch.empty(R, CAP, dtype=torch.int64, device=pooled.device)
        _topk_blocks_compact_kernel[(R,)](x, out, lim, scratch, flag, n, H, T, x.stride(0), slb, slt,
                                          K=total_blocks, KP=KP, NC=NC, NG=NG, CAP=CAP,
                                          HAS_LIM=limits is not None, num_warps=warps)
    _topk_blocks_kernel[(R,)](x, out, lim, flag if flag is not None else lim, n, H, T, x.stride(0), slb, slt,
                              K=total_blocks, KP=KP, NC=NC, HAS_LIM=limits is not None,
                              HAS_FLAG=flag is not None, EARLY_EXIT=bool(TUNING["topk_early_exit"]),
                              num_warps=warps)
    return out, flag


def warmup_length_classes(max_tokens: int, params, *, batch: int = 1, heads: tuple[int, int, int] = (32, 2, 128),
                          device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16) -> int:
    """Compile, on tiny inputs, the kernel variants whose Triton specialisation depends on the context length,
    for every context up to `max_tokens`: the top-k kernel per row-width class (powers of two up to
    `topk_max_cols()`; prefill rows with per-query limits, decode rows without) and the split decode selection
    per cache-capacity class at this decode batch. Without it the first request at each new length class pays
    those compilations inside its latency. heads = (query heads, KV heads, head dim). Returns the launches made."""
    from sala.ops.infllmv2 import compressed_lengths

    Hq, Hkv, D = heads
    K = params.total_blocks
    max_blocks = -(-int(max_tokens) // params.block_size) + 1
    launches = 0
    g = torch.Generator(device=device).manual_seed(0)
    nc = 16
    while nc <= min(topk_max_cols(), max(16, _pow2(max_blocks))):
        x = torch.rand(1, Hkv, 1, nc, device=device, generator=g)
        _topk_blocks(x, K, torch.full((1, 1), nc - 1, dtype=torch.int32, device=device))
        _topk_blocks(torch.rand(batch, Hkv, 1, nc, device=device, generator=g), K, None)
        launches += 2
        nc *= 2
    seen = set()
    cap = 256
    while cap < 2 * max_tokens:       # capacities double: every power-of-two class of decode splits is met
        n1, n2 = compressed_lengths(cap, params)
        sp2 = max(2, _pow2(decode_select_splits(batch, Hkv, max(1, n2), _k2_tile())[0]))
        if sp2 not in seen:
            seen.add(sp2)
            q = torch.zeros(batch, Hq, D, device=device, dtype=dtype)
            k1 = torch.zeros(batch, max(1, n1), Hkv, D, device=device, dtype=dtype)
            k2 = torch.zeros(batch, max(1, n2), Hkv, D, device=device, dtype=dtype)
            pos = torch.full((batch,), cap - 1, dtype=torch.int32, device=device)
            pooled_block_scores_decode_split(q, k1, k2, pos, params, D ** -0.5, -(-cap // params.block_size))
            launches += 2
        cap *= 2
    return launches


def topk_max_cols() -> int:
    """Widest pooled rows `topk_blocks_triton` takes under the current TUNING."""
    return TOPK_COMPACT_MAX_COLS if TUNING["topk_compact"] else int(TUNING["topk_max_cols"])


# ----------------------------------------------------------------------------------------------------------
# stage 2: block-sparse attention
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _selected_keys(ibase, kk, c, pos, kb, h, d, skn, skh, blk_lo, blk_hi, K: tl.constexpr, BS: tl.constexpr):
    """Keys of selected-block slots kk.. (len(c) // BS blocks) of one query at position pos: the key mask [len(c)]
    (slot < K, blk_lo <= block < blk_hi, causal) and the K/V element offsets [len(c), D] of kv head h (rows kb + key)."""
    slot = kk + c // BS
    blk = tl.load(ibase + slot, mask=slot < K, other=-1)
    key = blk * BS + c % BS
    kmask = (key <= pos) & (blk >= blk_lo) & (blk < blk_hi)
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
def _online_softmax(s, m, l):
    """One key tile of an online softmax (exp2 domain): scores s [M, N] (-inf = masked), running max m and sum l
    [M] -> (new max, factor alpha that rescales the old accumulator, probabilities p [M, N], new sum)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _dq_block(qv, dov, kt, vt, lse, delta, mask, scale_log2):
    """Unscaled dq of one key tile: p = exp2(q.k * scale_log2 - lse) where mask, ds = p * (do.v - delta), ds.k."""
    s = tl.dot(qv, tl.trans(kt)) * scale_log2
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(dov, tl.trans(vt)) - delta[:, None])
    return tl.dot(ds.to(kt.dtype), kt)


@triton.jit(do_not_specialize=["Tq", "sib", "sih"])
def _sparse_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, pos_ptr, kbase_ptr,
                       Tq, scale_log2,
                       sqn, sqh, skn, skh, son, soh, sln, sib, sih, sit,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, K: tl.constexpr,
                       KPI: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, BAND: tl.constexpr = False,
                       INIT: tl.constexpr = 0, LOCAL: tl.constexpr = 0):
    """Selected-block slots K0..K1 (of K), KPI blocks (KPI * BS keys) per iteration. BAND: o/lse already hold the
    forced blocks (init and the local band, `_sparse_band_fwd_kernel`); the slots hold every other selected block
    (forced ones are skipped by block number) and are merged into that state."""
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
        kmask, kvp = _selected_keys(ibase, kk, c, pos, kb, h, d, skn, skh, blk_lo, blk_hi, K, BS)
        kt = tl.load(k_ptr + kvp, mask=kmask[:, None], other=0.0)
        s = tl.where(kmask[None, :], tl.dot(qv, tl.trans(kt)) * scale_log2, float("-inf"))
        m, alpha, p, l = _online_softmax(s, m, l)
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
def _band_keys(kb, c, d, kbase, h, skn, skh, pmax, BS: tl.constexpr):
    """Key block kb (BS keys from kbase + kb * BS) of kv head h: positions [BS], K/V offsets [BS, D], load mask."""
    key = kb * BS + c
    return key, (kbase + key.to(tl.int64))[:, None] * skn + h * skh + d[None, :], key <= pmax


@triton.jit
def _band_step(qv, m, l, acc, k_ptr, v_ptr, kb, c, d, kbase, h, skn, skh, pos, rows, pmax, scale_log2,
               BS: tl.constexpr):
    """One key block kb of the online softmax of the rows `rows` at positions pos."""
    key, kvp, kin = _band_keys(kb, c, d, kbase, h, skn, skh, pmax, BS)
    kt = tl.load(k_ptr + kvp, mask=kin[:, None], other=0.0)
    s = tl.dot(qv, tl.trans(kt)) * scale_log2
    s = tl.where(rows[:, None] & (key[None, :] <= pos[:, None]), s, float("-inf"))
    m, alpha, p, l = _online_softmax(s, m, l)
    vt = tl.load(v_ptr + kvp, mask=kin[:, None], other=0.0)
    return m, l, acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)


@triton.jit(do_not_specialize=["N"])
def _sparse_band_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pos_ptr, kbase_ptr, N, scale_log2,
                            sqn, sqh, skn, skh, son, soh, sln,
                            G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr,
                            INIT: tl.constexpr, LOCAL: tl.constexpr):
    """The forced blocks of BM consecutive flat queries x one query head: init blocks below each row's band, then
    the band (blocks qb - LOCAL .. qb, causal). Rows of different key bases (documents, batch rows) are walked in
    one pass per key base (kbase ascending). Writes o and lse (log2) of the forced blocks alone."""
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
                                   pmax, scale_log2, BS)
        for kb in range(blo, bhi + 1):
            m, l, acc = _band_step(qv, m, l, acc, k_ptr, v_ptr, kb, c, d, cur, h, skn, skh, pos, rows & (kb >= lo),
                                   pmax, scale_log2, BS)
        l_safe = tl.where(l > 0, l, 1.0)
        tl.store(o_ptr + tok64[:, None] * son + hq * soh + d[None, :], (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
                 mask=rows[:, None])
        tl.store(lse_ptr + tok64 * sln + hq, m + tl.log2(l_safe), mask=rows)
        cur = _next_kbase(inb, kbr, cur)


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
    return max(16, _pow2(G))


def _band_slots(K: int, band: tuple[int, int] | None) -> tuple[int, int, dict]:
    """(first slot, end slot, extra constexprs) of the per-token walks: all K slots, or with band = (init, local)
    only init .. K - local - 1, where ascending indices keep every selected block that is not forced."""
    if band is None:
        return 0, K, {}
    init, local = band
    return init, max(init, K - local - 1), dict(BAND=True, INIT=init, LOCAL=local)


def _band_rows(key: str) -> int:
    """Queries per band program: TUNING[key] on the GPU, 16 in the interpreter."""
    return 16 if interpreter_enabled() else TUNING[key]


def sparse_attention_fwd(q, k, v, block_idx, pos, kbase, block_size, scale, band: tuple[int, int] | None = None):
    """q [N, Hq, D] flat queries (N = B*Tq of block_idx [B, Hkv, Tq, K]); k, v [Nk, Hkv, D] -> (o, lse log2).

    band = (init_blocks, local_blocks): block_idx comes from the selection with these forced blocks (init blocks
    and the local band qb - local .. qb are in every row). The forced blocks then run as dense query tiles
    (`_sparse_band_fwd_kernel`, K/V shared by TUNING["band_rows"] queries) and the per-token kernel walks only
    the K - init - local - 1 other slots, merging into the band's softmax state. Same result, less traffic.
    Requires kbase ascending along the flat queries (batch rows and documents in order)."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    B, _, Tq, K = block_idx.shape
    o = torch.empty_like(q)
    lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
    if N == 0:
        return o, lse
    k0, k1, extra = _band_slots(K, band)
    if band is not None:
        bm = _band_rows("band_rows")
        _sparse_band_fwd_kernel[(triton.cdiv(N, bm), Hq)](
            q, k, v, o, lse, pos, kbase, N, scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            o.stride(0), o.stride(1), lse.stride(0), G=G, D=D, BS=block_size, BM=bm, INIT=band[0], LOCAL=band[1],
            num_warps=TUNING["band_warps"], **_stages("band_stages"))
        if k1 == k0:
            return o, lse
    _sparse_fwd_kernel[(N, Hkv)](q, k, v, o, lse, block_idx, pos, kbase, Tq, scale * _LOG2E,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
                                 lse.stride(0), block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
                                 G=G, GP=_fwd_config(G), D=D, BS=block_size, K=K, KPI=_kpi(K), K0=k0, K1=k1,
                                 num_warps=TUNING["fwd_warps"], **_stages("fwd_stages"), **extra)
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
                         block_size, scale, band: tuple[int, int] | None = None):
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
        bm = _band_rows("band_dq_rows")
        _sparse_band_bwd_dq_kernel[(triton.cdiv(N, bm), Hq)](
            q, k, v, do, lse, delta, dq, pos, kbase, N, scale * _LOG2E, scale, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), lse.stride(0), G=G, D=D, BS=block_size, BM=bm, INIT=band[0], LOCAL=band[1],
            num_warps=TUNING["band_dq_warps"], **_stages("band_dq_stages"))
    if k1 > k0 and N:
        _sparse_bwd_dq_kernel[(N, Hkv)](q, k, v, do, lse, delta, dq, block_idx, pos, kbase, Tq, scale * _LOG2E,
                                        scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
                                        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
                                        G=G, GP=GP, D=D, BS=block_size, K=K, KPI=_kpi(K), K0=k0, K1=k1,
                                        num_warps=TUNING["fwd_warps"], **_stages("fwd_stages"), **extra)
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
    QT = max(1, 64 // _pow2(G)) if not interpreter_enabled() else max(1, 16 // _pow2(G))
    GPk = max(_pow2(G), 16 // QT)
    seg_len = QT * (8 if interpreter_enabled() else 16)
    seg_key, seg_start, seg_end, ent_q, n_seg = _invert_block_idx(block_idx, gbase, n_gid, seg_len)
    _sparse_bwd_dkdv_kernel[(n_seg,)](q, k, v, do, lse, delta, dk, dv, pos, seg_key, seg_start, seg_end, ent_q,
                                      gid_kstart, gid_blk, n_gid, Nk, scale * _LOG2E, scale,
                                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
                                      dk.stride(0), dk.stride(1),
                                      G=G, GP=GPk, D=D, BS=block_size, QT=QT, num_warps=4)
    return dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention on flat tokens; see `sparse_attention_fwd`. Selection is not differentiated."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, pos, kbase, gbase, gid_kstart, gid_blk, n_gid, block_size, scale,
                band=None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = sparse_attention_fwd(q, k, v, block_idx, pos, kbase, block_size, scale, band)
        ctx.save_for_backward(q, k, v, o, lse, block_idx, pos, kbase, gbase, gid_kstart, gid_blk)
        ctx.meta = (n_gid, block_size, scale, band)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_idx, pos, kbase, gbase, gid_kstart, gid_blk = ctx.saved_tensors
        n_gid, block_size, scale, band = ctx.meta
        dq, dk, dv = sparse_attention_bwd(do, q, k, v, o, lse, block_idx, pos, kbase, gbase, n_gid, gid_kstart,
                                          gid_blk, block_size, scale, band if TUNING["band_split_dq"] else None)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# query-tiled block-sparse attention (SALA_SPARSE_ATTN=tiled)
# ----------------------------------------------------------------------------------------------------------
def _tiled_tokens() -> int:
    tm = 4 if interpreter_enabled() else int(TUNING["tiled_tokens"])
    if tm < 1 or tm > 16 or tm & (tm - 1):
        raise ValueError(f"infllmv2 tiled attention: TUNING['tiled_tokens'] must be a power of two in 1..16, got {tm}")
    return tm


def _tiled_rows(G: int, TM: int) -> int:
    """Padded group width GP so that TM * GP >= 16 (tl.dot's minimum M)."""
    return max(_pow2(G), 16 // TM)


def tile_block_union(block_idx: torch.Tensor, gbase: torch.Tensor, TM: int):
    """Per (kv head, tile of TM flat tokens): sorted unique global key blocks and token membership (device only).

    block_idx int [B, Hkv, Tq, K] (-1 = none; flat token n = b * Tq + t), gbase int64 [N] global block id of the
    first key block of token n's sequence. Returns (union int32 [Hkv, n_tiles, TM*K] (-1 padded), member int32
    [Hkv, n_tiles, TM*K] (bit j: token j of the tile selected the block), count int32 [Hkv, n_tiles]).
    """
    B, H, Tq, K = block_idx.shape
    N = B * Tq
    n_tiles = triton.cdiv(N, TM)
    big = torch.iinfo(torch.int32).max
    dev = block_idx.device
    idx = block_idx.permute(1, 0, 2, 3).reshape(H, N, K)
    gid = torch.where(idx >= 0, gbase.to(torch.int32)[None, :, None] + idx.to(torch.int32),
                      torch.full((), big, dtype=torch.int32, device=dev))
    if n_tiles * TM != N:
        gid = torch.cat([gid, gid.new_full((H, n_tiles * TM - N, K), big)], dim=1)
    gid = gid.reshape(H, n_tiles, TM * K)
    sv, order = torch.sort(gid, dim=-1)
    first = torch.ones_like(sv, dtype=torch.bool)
    first[..., 1:] = sv[..., 1:] != sv[..., :-1]
    valid = sv != big
    slot = torch.cumsum(first, dim=-1, dtype=torch.int32).sub_(1).to(torch.int64)
    union = torch.full_like(sv, -1)
    union.scatter_(-1, slot, torch.where(valid, sv, torch.full_like(sv, -1)))
    bit = torch.bitwise_left_shift(torch.ones((), dtype=torch.int32, device=dev),
                                   torch.div(order, K, rounding_mode="floor").to(torch.int32))
    member = torch.zeros_like(sv)
    member.scatter_add_(-1, slot, torch.where(valid, bit, torch.zeros_like(bit)))
    count = (first & valid).sum(-1, dtype=torch.int32)
    return union, member, count


@triton.jit
def _tile_query_rows(tile, N, pos_ptr, G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr):
    """The TM * GP rows of one query tile (token, head slot): their token slot, head slot, flat token, validity
    and position, plus the tile's TM token slots and positions."""
    ROWS: tl.constexpr = TM * GP
    r = tl.arange(0, ROWS)
    tok_r = r // GP
    g = r % GP
    n_r = tile * TM + tok_r
    row_ok = (n_r < N) & (g < G)
    pos_r = tl.load(pos_ptr + n_r, mask=n_r < N, other=-1)
    tok = tl.arange(0, TM)
    n_t = tile * TM + tok
    pos_t = tl.load(pos_ptr + n_t, mask=n_t < N, other=-1)
    return tok_r, g, n_r, row_ok, pos_r, tok, pos_t


@triton.jit
def _tiled_union_block(union_ptr, member_ptr, gid_kstart_ptr, gid_blk_ptr, ubase, u, tok, tok_r, pos_t, pos_r,
                       c, d, h, skn, skh, Nk, BS: tl.constexpr):
    """Union block u of a tile: key offsets [BS, D], key-column load mask [BS], per-row attend mask [ROWS, BS]."""
    gid = tl.load(union_ptr + ubase + u)
    bits = tl.load(member_ptr + ubase + u)
    ks = tl.load(gid_kstart_ptr + gid).to(tl.int64)
    blk = tl.load(gid_blk_ptr + gid)
    kp = blk * BS + c
    mem_t = ((bits >> tok) & 1) != 0
    col_ok = tl.max(tl.where(mem_t[:, None] & (kp[None, :] <= pos_t[:, None]), 1, 0), axis=0) > 0
    col_ok = col_ok & ((ks + c.to(tl.int64)) < Nk)
    mem_r = ((bits >> tok_r) & 1) != 0
    ok = mem_r[:, None] & (kp[None, :] <= pos_r[:, None]) & col_ok[None, :]
    kptr = (ks + c.to(tl.int64))[:, None] * skn + h * skh + d[None, :]
    return kptr, col_ok, ok


@triton.jit
def _sparse_fwd_tiled_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, union_ptr, member_ptr, count_ptr, pos_ptr,
                             gid_kstart_ptr, gid_blk_ptr, N, Nk, n_tiles, scale_log2,
                             sqn, sqh, skn, skh, son, soh, sln, suh, sut,
                             G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    ROWS: tl.constexpr = TM * GP
    tok_r, g, n_r, row_ok, pos_r, tok, pos_t = _tile_query_rows(tile, N, pos_ptr, G, GP, TM)
    d = tl.arange(0, D)
    c = tl.arange(0, BS)
    qrow = n_r.to(tl.int64)[:, None] * sqn + (h * G + g)[:, None] * sqh + d[None, :]
    qv = tl.load(q_ptr + qrow, mask=row_ok[:, None], other=0.0)
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    ubase = h.to(tl.int64) * suh + tile.to(tl.int64) * sut
    cnt = tl.load(count_ptr + h * n_tiles + tile)
    for u in range(0, cnt):
        kptr, col_ok, ok = _tiled_union_block(union_ptr, member_ptr, gid_kstart_ptr, gid_blk_ptr, ubase, u, tok, tok_r,
                                              pos_t, pos_r, c, d, h, skn, skh, Nk, BS)
        kt = tl.load(k_ptr + kptr, mask=col_ok[:, None], other=0.0)
        s = tl.where(ok, tl.dot(qv, tl.trans(kt)) * scale_log2, float("-inf"))
        m, alpha, p, l = _online_softmax(s, m, l)
        vt = tl.load(v_ptr + kptr, mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    orow = n_r.to(tl.int64)[:, None] * son + (h * G + g)[:, None] * soh + d[None, :]
    tl.store(o_ptr + orow, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + n_r.to(tl.int64) * sln + h * G + g, m + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _sparse_bwd_dq_tiled_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, union_ptr, member_ptr,
                                count_ptr, pos_ptr, gid_kstart_ptr, gid_blk_ptr, N, Nk, n_tiles, scale_log2, scale,
                                sqn, sqh, skn, skh, sln, suh, sut,
                                G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, D: tl.constexpr,
                                BS: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    ROWS: tl.constexpr = TM * GP
    tok_r, g, n_r, row_ok, pos_r, tok, pos_t = _tile_query_rows(tile, N, pos_ptr, G, GP, TM)
    d = tl.arange(0, D)
    c = tl.arange(0, BS)
    rows = n_r.to(tl.int64)[:, None] * sqn + (h * G + g)[:, None] * sqh + d[None, :]
    qv = tl.load(q_ptr + rows, mask=row_ok[:, None], other=0.0)
    dov = tl.load(do_ptr + rows, mask=row_ok[:, None], other=0.0)
    lrow = n_r.to(tl.int64) * sln + h * G + g
    lse = tl.load(lse_ptr + lrow, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + lrow, mask=row_ok, other=0.0)
    dq = tl.zeros([ROWS, D], dtype=tl.float32)
    ubase = h.to(tl.int64) * suh + tile.to(tl.int64) * sut
    cnt = tl.load(count_ptr + h * n_tiles + tile)
    for u in range(0, cnt):
        kptr, col_ok, ok = _tiled_union_block(union_ptr, member_ptr, gid_kstart_ptr, gid_blk_ptr, ubase, u, tok, tok_r,
                                              pos_t, pos_r, c, d, h, skn, skh, Nk, BS)
        kt = tl.load(k_ptr + kptr, mask=col_ok[:, None], other=0.0)
        vt = tl.load(v_ptr + kptr, mask=col_ok[:, None], other=0.0)
        dq += _dq_block(qv, dov, kt, vt, lse, delta, ok & row_ok[:, None], scale_log2)
    tl.store(dq_ptr + rows, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def sparse_attention_fwd_tiled(q, k, v, block_idx, pos, gbase, gid_kstart, gid_blk, block_size, scale, *,
                               union=None, o=None):
    """Query-tiled forward; same contract as `sparse_attention_fwd` plus the global key-block tables.

    gbase int64 [N]: global block id of each query's first key block; gid_kstart int64 / gid_blk int32
    [n_gid]: flat first key and in-sequence block number of every global block. union: a precomputed
    `tile_block_union` result (else built here). o: optional output buffer [N, Hq, D]. Returns (o, lse log2).
    """
    N, Hq, D = q.shape
    Nk, Hkv = k.shape[0], k.shape[1]
    G = Hq // Hkv
    TM = _tiled_tokens()
    o = torch.empty_like(q) if o is None else o
    lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
    if N == 0:
        return o, lse
    un, member, count = tile_block_union(block_idx, gbase, TM) if union is None else union
    n_tiles = un.shape[1]
    _sparse_fwd_tiled_kernel[(n_tiles, Hkv)](
        q, k, v, o, lse, un, member, count, pos, gid_kstart, gid_blk, N, Nk, n_tiles, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1), lse.stride(0),
        un.stride(0), un.stride(1),
        G=G, GP=_tiled_rows(G, TM), TM=TM, D=D, BS=block_size,
        num_warps=TUNING["tiled_warps"] if not interpreter_enabled() else 4, **_stages("tiled_stages"))
    return o, lse


def sparse_attention_bwd_tiled(do, q, k, v, o, lse, block_idx, union, pos, gbase, n_gid, gid_kstart, gid_blk,
                               block_size, scale):
    """dq by the tiled walk (same unions as the forward); dk, dv by the KV-block-owned inverted-index kernel."""
    N, Hq, D = q.shape
    Nk, Hkv, _ = k.shape
    G = Hq // Hkv
    TM = _tiled_tokens()
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)                               # [N, Hq]
    dq = torch.empty_like(q)
    un, member, count = union
    n_tiles = un.shape[1]
    _sparse_bwd_dq_tiled_kernel[(n_tiles, Hkv)](
        q, k, v, do, lse, delta, dq, un, member, count, pos, gid_kstart, gid_blk, N, Nk, n_tiles,
        scale * _LOG2E, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        un.stride(0), un.stride(1),
        G=G, GP=_tiled_rows(G, TM), TM=TM, D=D, BS=block_size,
        num_warps=TUNING["tiled_warps"] if not interpreter_enabled() else 4, **_stages("tiled_stages"))
    dk, dv = _sparse_bwd_dkdv(do, q, k, v, lse, delta, block_idx, pos, gbase, n_gid, gid_kstart, gid_blk,
                              block_size, scale)
    return dq, dk, dv


class TiledSparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention on flat tokens with the query-tiled kernels (SALA_SPARSE_ATTN=tiled)."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, pos, kbase, gbase, gid_kstart, gid_blk, n_gid, block_size, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        union = tile_block_union(block_idx, gbase, _tiled_tokens())
        o, lse = sparse_attention_fwd_tiled(q, k, v, block_idx, pos, gbase, gid_kstart, gid_blk, block_size,
                                            scale, union=union)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, o, lse, block_idx, pos, gbase, gid_kstart, gid_blk, *union)
        ctx.meta = (n_gid, block_size, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_idx, pos, gbase, gid_kstart, gid_blk, *union = ctx.saved_tensors
        n_gid, block_size, scale = ctx.meta
        dq, dk, dv = sparse_attention_bwd_tiled(do, q, k, v, o, lse, block_idx, tuple(union), pos, gbase, n_gid,
                                                gid_kstart, gid_blk, block_size, scale)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# split-K decode (SALA_SPARSE_DECODE=splitk)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _sparse_decode_splitk_kernel(q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, idx_ptr, pos_ptr, kbase_ptr, scale_log2,
                                 sqb, sqh, skn, skh, sib, sih, spb, sph, sps, spg, slb, slh, sls,
                                 K: tl.constexpr, BPS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                                 D: tl.constexpr, BS: tl.constexpr):
    """Program (split, kv head, sequence): blocks [split*BPS, split*BPS + BPS) of the sequence's selection."""
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
        rowp = (kb + key.to(tl.int64))[:, None]
        kt = tl.load(k_ptr + rowp * skn + h * skh + d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.where(kmask[None, :], tl.dot(qv, tl.trans(kt)) * scale_log2, float("-inf"))
        m, alpha, p, l = _online_softmax(s, m, l)
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


def decode_splits(B: int, Hkv: int, K: int) -> tuple[int, int]:
    """(splits, blocks per split) so that B * Hkv * splits >= TUNING['decode_min_programs'] when K allows."""
    want = max(1, -(-int(TUNING["decode_min_programs"]) // max(1, B * Hkv)))
    bps = max(1, -(-K // min(K, want)))
    return -(-K // bps), bps


def sparse_decode_splitk(q, k, v, block_idx, pos, kbase, block_size, scale):
    """Flash-decoding over selected blocks: q [B, Hq, D]; k, v [B*S, Hkv, D] flat caches; block_idx [B, Hkv, 1, K];
    pos int32 [B] (position of the new token); kbase int64 [B]. Returns o [B, Hq, D] in q.dtype."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    K = block_idx.shape[-1]
    GP = max(16, _pow2(G))
    nsplit, bps = decode_splits(B, Hkv, K)
    po = torch.empty(B, Hkv, nsplit, GP, D, dtype=torch.float32, device=q.device)
    plse = torch.empty(B, Hkv, nsplit, GP, dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    if B == 0:
        return o
    _sparse_decode_splitk_kernel[(nsplit, Hkv, B)](
        q, k, v, po, plse, block_idx, pos, kbase, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), block_idx.stride(0), block_idx.stride(1),
        po.stride(0), po.stride(1), po.stride(2), po.stride(3), plse.stride(0), plse.stride(1), plse.stride(2),
        K=K, BPS=bps, G=G, GP=GP, D=D, BS=block_size, num_warps=4)
    _splitk_combine_kernel[(Hq, B)](po, plse, o, po.stride(0), po.stride(1), po.stride(2), po.stride(3),
                                    plse.stride(0), plse.stride(1), plse.stride(2), o.stride(0), o.stride(1),
                                    nsplit, G=G, SP=max(2, _pow2(nsplit)), D=D, num_warps=4)
    return o


# ----------------------------------------------------------------------------------------------------------
# split-N decode selection (SALA_SPARSE_DECODE_SELECT=split)
# ----------------------------------------------------------------------------------------------------------
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
                             sqb, sqh, s2b, s2t, s2h, slb, slh, sls,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, K2K: tl.constexpr,
                             K2S: tl.constexpr, BN2: tl.constexpr):
    """Program (split, kv head, sequence): partial log2-sum-exp of the G heads over K2 columns
    [split*cps, split*cps + cps) that the new token sees (-inf when none)."""
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
    k2base = k2_ptr + b.to(tl.int64) * s2b + h * s2h
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
                              sqb, sqh, s1b, s1t, s1h, slb, slh, sls, sob, soh,
                              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, K1K: tl.constexpr,
                              K1S: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr,
                              INIT: tl.constexpr, LOCAL: tl.constexpr, NB: tl.constexpr, SP2: tl.constexpr):
    """Program (split, kv head, sequence): pooled scores of blocks [split*bps, split*bps + bps) of the new token.

    Combines the partial K2 log-sum-exps of `_decode_lse_split_kernel`, then K1 pass + group sum + max-pool over
    its blocks (the halo of the block before the range is recomputed). Blocks after the own block keep the
    caller's -inf."""
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
        k1base = k1_ptr + b.to(tl.int64) * s1b + h * s1h
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


def _select_nb(r: int) -> int:
    """Blocks per K1 tile of the selection kernels (tile = NB * r K1 columns)."""
    return max(16 // r, 2) if interpreter_enabled() else max(TUNING["select_k1_tile"] // r, 2)


def decode_select_splits(B: int, Hkv: int, n_items: int, unit: int) -> tuple[int, int]:
    """(splits, items per split) over n_items (blocks or K2 columns) so that B * Hkv * splits >=
    TUNING['decode_select_programs'] when n_items allows; items per split a multiple of `unit`."""
    want = max(1, -(-int(TUNING["decode_select_programs"]) // max(1, B * Hkv)))
    n_units = max(1, -(-n_items // unit))
    per = -(-n_units // min(n_units, want)) * unit
    return max(1, -(-n_items // per)), per


def _k2_tile() -> int:
    """K2 columns per tile of the selection kernels, prefill and split decode (16 in the interpreter)."""
    return 16 if interpreter_enabled() else 64


def pooled_block_scores_decode_split(q, k1, k2, pos, params, scale, n_blocks) -> torch.Tensor:
    """Decode stage 1 split over the compressed keys: q [B, Hq, D], k1/k2 caches [B, S1|S2, Hkv, D], pos int32 [B]
    (position of the new token) -> pooled block scores fp32 [B, Hkv, 1, n_blocks] (as `pooled_block_scores_ref`).

    Two launches, no host sync; grid sizes depend only on B, Hkv and the cache capacities."""
    B, Hq, D = q.shape
    Hkv = k1.shape[2]
    G = Hq // Hkv
    r = params.block_size // params.kernel_stride
    halo = (params.kernel_size - 1) // params.kernel_stride
    if halo > r or r & (r - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"infllmv2 Triton selection needs block_size/kernel_stride a power of two ({r}), "
                         f"(kernel_size-1)//kernel_stride <= that ({halo}), head_dim a power of two >= 16 ({D})")
    out = torch.full((B, Hkv, 1, n_blocks), float("-inf"), dtype=torch.float32, device=q.device)
    if B == 0 or n_blocks == 0:
        return out
    GP = max(16, _pow2(G))
    BN2 = _k2_tile()
    nsplit2, cps = decode_select_splits(B, Hkv, max(1, k2.shape[1]), BN2)
    plse = torch.empty(B, Hkv, nsplit2, GP, dtype=torch.float32, device=q.device)
    pos = pos.to(torch.int32).contiguous()
    _decode_lse_split_kernel[(nsplit2, Hkv, B)](
        q, k2, pos, plse, k2.shape[1], cps, scale * _LOG2E, q.stride(0), q.stride(1),
        k2.stride(0), k2.stride(1), k2.stride(2), plse.stride(0), plse.stride(1), plse.stride(2),
        G=G, GP=GP, D=D, K2K=params.k2_kernel, K2S=params.k2_stride, BN2=BN2, num_warps=4)
    NB = _select_nb(r)
    nsplit, bps = decode_select_splits(B, Hkv, n_blocks, NB)
    _decode_pool_split_kernel[(nsplit, Hkv, B)](
        q, k1, pos, plse, out, k1.shape[1], n_blocks, nsplit2, bps, scale * _LOG2E, q.stride(0), q.stride(1),
        k1.stride(0), k1.stride(1), k1.stride(2), plse.stride(0), plse.stride(1), plse.stride(2),
        out.stride(0), out.stride(1),
        G=G, GP=GP, D=D, K1K=params.kernel_size, K1S=params.kernel_stride, BS=params.block_size, R=r, HALO=halo,
        INIT=params.init_blocks, LOCAL=params.local_blocks, NB=NB, SP2=max(2, _pow2(nsplit2)), num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# fused varlen compression and selection (SALA_SPARSE_VARLEN=fused)
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_win"])
def _compress_flat_kernel(k_ptr, out_ptr, start_ptr, n_win, skt, skh, sot, soh,
                          KERNEL: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """Program (window tile, head): out[w] = mean of k[start[w] .. start[w] + KERNEL) (flat tokens)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    w = pid * BJ + tl.arange(0, BJ)
    wm = w < n_win
    st = tl.load(start_ptr + w, mask=wm, other=0).to(tl.int64)
    d = tl.arange(0, D)
    acc = tl.zeros([BJ, D], dtype=tl.float32)
    for c in range(KERNEL):
        kp = k_ptr + (st + c)[:, None] * skt + h * skh + d[None, :]
        acc += tl.load(kp, mask=wm[:, None], other=0.0).to(tl.float32)
    acc = acc / KERNEL
    tl.store(out_ptr + w.to(tl.int64)[:, None] * sot + h * soh + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=wm[:, None])


def compress_flat(k: torch.Tensor, starts: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean-pooled windows of flat keys: k [T, H, D], starts int64 [W] (first token of each window, all windows
    inside k) -> [W, H, D] in k.dtype (fp32 accumulation)."""
    T, H, D = k.shape
    W = starts.shape[0]
    out = torch.empty(W, H, D, dtype=k.dtype, device=k.device)
    if W:
        BJ = 16
        _compress_flat_kernel[(triton.cdiv(W, BJ), H)](k, out, starts, W, k.stride(0), k.stride(1), out.stride(0),
                                                       out.stride(1), KERNEL=kernel, D=D, BJ=BJ)
    return out


@triton.jit(do_not_specialize=["tile_lo", "row_lo", "row_hi", "n_cols", "soh", "sot"])
def _varlen_block_scores_kernel(q_ptr, k1_ptr, k2_ptr, sq_tok_ptr, sq_pos_ptr, tile_ptr, out_ptr,
                                tile_lo, row_lo, row_hi, n_cols, scale_log2,
                                sqn, sqh, s1t, s1h, s2t, s2h, stt, soh, sot,
                                G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr,
                                K1K: tl.constexpr, K1S: tl.constexpr, K2K: tl.constexpr, K2S: tl.constexpr,
                                BS: tl.constexpr, R: tl.constexpr, HALO: tl.constexpr,
                                INIT: tl.constexpr, LOCAL: tl.constexpr, BN2: tl.constexpr, NB: tl.constexpr,
                                BRANCH_MASK: tl.constexpr, SPLIT_K2: tl.constexpr, MASK_AFTER_SUM: tl.constexpr,
                                POOL_GATHER: tl.constexpr = False):
    """`_block_scores_kernel` for packed documents: program (tile, kv head); a tile holds <= BQ consecutive sparse
    queries of one document. tile table int64 [n_tiles, 4]: first sparse query, count, K1 offset and K2 offset
    of the document in the flat compressed keys. Writes pooled rows [row_lo, row_hi) of the sparse queries."""
    tile = tile_lo + tl.program_id(0)
    h = tl.program_id(1)
    ROWS: tl.constexpr = BQ * GP
    first = tl.load(tile_ptr + tile * stt)
    count = tl.load(tile_ptr + tile * stt + 1)
    k1off = tl.load(tile_ptr + tile * stt + 2)
    k2off = tl.load(tile_ptr + tile * stt + 3)
    rows = tl.arange(0, ROWS)
    g = rows % GP
    i_row = rows // GP
    si_row = first + i_row
    in_row = (i_row < count) & (si_row >= row_lo) & (si_row < row_hi)
    row_ok = in_row & (g < G)
    pos_row = tl.load(sq_pos_ptr + si_row, mask=in_row, other=-1)
    tok_row = tl.load(sq_tok_ptr + si_row, mask=in_row, other=0).to(tl.int64)
    i_tok = tl.arange(0, BQ)
    si_tok = first + i_tok
    tok_ok = (i_tok < count) & (si_tok >= row_lo) & (si_tok < row_hi)
    pos_tok = tl.load(sq_pos_ptr + si_tok, mask=tok_ok, other=-1)
    pos_max = tl.max(pos_tok, axis=0)
    pos_min = tl.min(tl.where(tok_ok, pos_tok, 2147483647), axis=0)
    d = tl.arange(0, D)
    qv = tl.load(q_ptr + tok_row[:, None] * sqn + (h * G + g)[:, None] * sqh + d[None, :], mask=row_ok[:, None],
                 other=0.0)

    lse = _select_k2_lse(qv, k2_ptr + k2off * s2t + h * s2h, s2t, pos_row, pos_min, pos_max, scale_log2, d, ROWS,
                         K2K, K2S, BN2, BRANCH_MASK, SPLIT_K2)
    obase = out_ptr + h.to(tl.int64) * soh + (si_tok - row_lo).to(tl.int64)[:, None] * sot
    _select_k1_pool_store(qv, lse, k1_ptr + k1off * s1t + h * s1h, s1t, pos_row, row_ok, pos_tok, pos_min, pos_max,
                          tok_ok, obase, n_cols, scale_log2, d, BQ, GP, K1K, K1S, BS, R, HALO, INIT, LOCAL, NB,
                          BRANCH_MASK, MASK_AFTER_SUM, POOL_GATHER)


def varlen_select_tokens(G: int) -> int:
    """Sparse queries per program (tile) of the varlen selection kernel."""
    rows = 16 if interpreter_enabled() else TUNING["select_rows"]
    return max(1, rows // _pow2(G))


def varlen_pooled_block_scores(q, k1, k2, sq_tok, sq_pos, tiles, tile_lo, tile_hi, row_lo, row_hi, params,
                               scale, n_blocks) -> torch.Tensor:
    """Pooled block scores fp32 [Hkv, row_hi - row_lo, n_blocks] of sparse queries row_lo..row_hi-1 of a packed row.

    q [T, Hq, D] flat queries; k1/k2 [W1|W2, Hkv, D] flat compressed keys of all documents; sq_tok int64 /
    sq_pos int32 [Ns]: flat token and in-document position of every sparse query; tiles int64 [n_tiles, 4]
    (see `_varlen_block_scores_kernel`); tiles tile_lo..tile_hi-1 cover the rows."""
    T, Hq, D = q.shape
    Hkv = k1.shape[1]
    G = Hq // Hkv
    r = params.block_size // params.kernel_stride
    halo = (params.kernel_size - 1) // params.kernel_stride
    _check_selection(r, halo, D, scale)
    out = torch.full((Hkv, row_hi - row_lo, n_blocks), float("-inf"), dtype=torch.float32, device=q.device)
    if row_hi <= row_lo or tile_hi <= tile_lo:
        return out
    BQ = varlen_select_tokens(G)
    GP = max(_pow2(G), -(-16 // BQ))
    NB = _select_nb(r)
    _varlen_block_scores_kernel[(tile_hi - tile_lo, Hkv)](
        q, k1, k2, sq_tok, sq_pos, tiles, out, tile_lo, row_lo, row_hi, n_blocks, scale * _LOG2E,
        q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k2.stride(0), k2.stride(1), tiles.stride(0),
        out.stride(0), out.stride(1),
        G=G, GP=GP, BQ=BQ, D=D, K1K=params.kernel_size, K1S=params.kernel_stride, K2K=params.k2_kernel,
        K2S=params.k2_stride, BS=params.block_size, R=r, HALO=halo, INIT=params.init_blocks,
        LOCAL=params.local_blocks, BN2=_k2_tile(), NB=NB,
        BRANCH_MASK=_branch_mask(), **_select_masks(), num_warps=TUNING["select_warps"] if BQ * GP >= 64 else 4, **_stages("select_stages"))
    return out
