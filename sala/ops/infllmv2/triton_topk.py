"""Triton top-k of pooled block scores (radix select on the float bits, one program per row)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from sala.ops.infllmv2.reference import topk_block_indices
from sala.ops.infllmv2.triton_utils import TUNING, pow2

# Opt-in (TUNING["topk_compact"], measured slower on the H200, hence off): rows up to TOPK_COMPACT_MAX_COLS go through
# `_topk_blocks_compact_kernel` (a handful of passes instead of 31), with the bisection kernel as its fallback.
TOPK_COMPACT_MAX_COLS = 32768
_NEG_INF_KEY = tl.constexpr(-2139095041)   # order-preserving int32 image of -inf (0xFF800000 ^ 0x7FFFFFFF)
_INF_KEY = tl.constexpr(2139095040)        # image of +inf (0x7F800000); NaN images are larger


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
    return topk_blocks_flagged(pooled, total_blocks, limits)[0]


def topk_blocks_flagged(pooled: torch.Tensor, total_blocks: int,
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
    NC = max(16, pow2(n))
    KP = max(16, pow2(total_blocks))
    warps = 4 if NC <= 2048 else (8 if NC <= 8192 else 16)
    flag = None
    if TUNING["topk_compact"]:
        NG = max(16, min(256, NC // 16))
        CAP = max(64, pow2(4 * total_blocks))
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


def topk_max_cols() -> int:
    """Widest pooled rows `topk_blocks_triton` takes under the current TUNING."""
    return TOPK_COMPACT_MAX_COLS if TUNING["topk_compact"] else int(TUNING["topk_max_cols"])

