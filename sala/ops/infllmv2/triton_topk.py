"""Triton top-k of pooled block scores (radix select on the float bits, one program per row).

Tie rule (docs/sparse.md): among equal scores at the cut-off the lowest block indices are kept, as in the
reference `topk_block_indices`. Narrow rows are held in registers (bisection on the bits), wide ones are read
in tiles (radix select, 8 bits a pass).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.dispatch import interpreter_enabled
from sala.ops.infllmv2.params import DEFAULT_KERNEL_CONFIG
from sala.ops.infllmv2.reference import topk_block_indices
from sala.ops.infllmv2.triton_utils import pow2

_NEG_INF_KEY = tl.constexpr(-2139095041)   # order-preserving int32 image of -inf (0xFF800000 ^ 0x7FFFFFFF)


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
                     K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, HAS_LIM: tl.constexpr):
    """Top-K of row r by bisection: the K-th largest image is found bit by bit (up to 31 counting passes over the
    row, held in registers); ties at the cut-off go to the lowest columns (docs/sparse.md, "Tie rule"). The
    bisection stops at the first candidate cut-off that exactly K images reach (then "image >= cut-off" is the
    answer; on distinct values that happens once the bits of the K-th and (K+1)-th largest part)."""
    key = _topk_row_keys(x_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, NC, HAS_LIM)
    valid = key > _NEG_INF_KEY
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    # the K-th largest image: sign first, then bits 30..0 (setting a bit raises a two's-complement value)
    n_nonneg = tl.sum((key >= 0).to(tl.int32), axis=0)
    thr = tl.where(n_nonneg >= K, 0, -2147483647 - 1)
    bit = 30
    exact = (n_nonneg == K) | (n_valid <= K)          # at most K candidates: every one, no bisection
    while (bit >= 0) & (exact == 0):
        cand = thr | (1 << bit)
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= K, cand, thr)
        exact = cnt == K
        bit -= 1
    above = key > thr
    need = K - tl.sum(above.to(tl.int32), axis=0)
    tie = key == thr
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    sel = tl.where(n_valid <= K, valid, sel)
    _topk_store(out_ptr, r, sel, K, KP, NC)


@triton.jit(do_not_specialize=["n_cols", "H", "T", "sxr", "slb", "slt"])
def _topk_blocks_kernel(x_ptr, out_ptr, lim_ptr, n_cols, H, T, sxr, slb, slt,
                        K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, HAS_LIM: tl.constexpr):
    """Row r of x [R, n_cols] fp32 -> the column indices of its K largest values other than -inf, ascending,
    -1 padded, at out + r * K (`_topk_bisect_row`). With HAS_LIM, row r = (b, h, t) of [B, H, T] reads only
    its first lim[b, t] columns."""
    _topk_bisect_row(x_ptr, out_ptr, lim_ptr, tl.program_id(0), n_cols, H, T, sxr, slb, slt, K, KP, NC, HAS_LIM)


@triton.jit
def _radix_keys(x_ptr, r, c0, n, sxr, TILE: tl.constexpr):
    """Columns c0 .. c0 + TILE of row r: their order-preserving int32 images (-inf past n) and the columns."""
    cols = c0 + tl.arange(0, TILE)
    x = tl.load(x_ptr + r.to(tl.int64) * sxr + cols, mask=cols < n, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF), cols


@triton.jit(do_not_specialize=["n_cols", "H", "T", "sxr", "slb", "slt"])
def _topk_radix_kernel(x_ptr, out_ptr, lim_ptr, n_cols, H, T, sxr, slb, slt,
                       K: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, HAS_LIM: tl.constexpr):
    """Top-K of row r = program 0 of x [R, n_cols] fp32 for wide rows, read from memory in tiles: radix select
    of the K-th largest image, 8 bits a pass (4 histogram passes), then one pass that writes the columns above
    it and the lowest columns equal to it, ascending, -1 padded (the tie rule of `_topk_bisect_row`)."""
    r = tl.program_id(0)
    n = n_cols
    if HAS_LIM:
        b = r // (H * T)
        t = r % T
        n = tl.minimum(tl.load(lim_ptr + b.to(tl.int64) * slb + t.to(tl.int64) * slt), n_cols)
    bins = tl.arange(0, 512)
    # the K-th largest image u (as unsigned: sign bit flipped), found 8 bits at a time from the top; `need`: how
    # many of the images sharing the bits found so far are still to be taken
    prefix = tl.full([], 0, tl.int32)
    need = tl.full([], K, tl.int32)
    n_valid = tl.full([], 0, tl.int32)
    for p in tl.static_range(4):
        hist = tl.zeros([512], dtype=tl.int32)
        for c0 in range(0, n, TILE):
            key, cols = _radix_keys(x_ptr, r, c0, n, sxr, TILE)
            u = key ^ (-2147483647 - 1)
            match = key > _NEG_INF_KEY
            if p > 0:
                match = match & (((u ^ prefix) >> (32 - 8 * p)) == 0)
            digit = (u >> (24 - 8 * p)) & 0xFF
            # bin 255 - digit: larger images in lower bins; everything else in the spare bin 511
            hist += tl.histogram(tl.where(match, 255 - digit, 511), 512)
        hist = tl.where(bins < 256, hist, 0)
        if p == 0:
            n_valid = tl.sum(hist, axis=0)
        cum = tl.cumsum(hist, axis=0)
        rd = tl.sum(((cum < need) & (bins < 256)).to(tl.int32), axis=0)      # first bin reaching `need`
        need -= tl.sum(tl.where(bins == rd, cum - hist, 0), axis=0)
        prefix = prefix | ((255 - rd) << (24 - 8 * p))
    thr = prefix ^ (-2147483647 - 1)                                         # back to a signed image
    all_valid = n_valid <= K
    tie_seen = tl.full([], 0, tl.int32)
    n_sel = tl.full([], 0, tl.int32)
    obase = out_ptr + r.to(tl.int64) * K
    for c0 in range(0, n, TILE):
        key, cols = _radix_keys(x_ptr, r, c0, n, sxr, TILE)
        valid = key > _NEG_INF_KEY
        tie = (key == thr) & valid
        rank = tl.cumsum(tie.to(tl.int32), axis=0) + tie_seen
        sel = tl.where(all_valid, valid, ((key > thr) & valid) | (tie & (rank <= need)))
        slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1 + n_sel
        tl.store(obase + slot, cols, mask=sel)
        tie_seen += tl.sum(tie.to(tl.int32), axis=0)
        n_sel += tl.sum(sel.to(tl.int32), axis=0)
    kk = tl.arange(0, KP)
    tl.store(obase + kk, tl.full([KP], -1, tl.int32), mask=(kk >= n_sel) & (kk < K))


def topk_blocks_triton(pooled: torch.Tensor, total_blocks: int, *, limits: torch.Tensor | None = None,
                       max_cols: int = DEFAULT_KERNEL_CONFIG.topk_max_cols) -> torch.Tensor:
    """`topk_block_indices` in one kernel: pooled fp32 [..., n] -> int32 [..., total_blocks], ascending, -1 padded.

    limits: int32 [B, T] for pooled [B, H, T, n]: row (b, h, t) considers only its first limits[b, t] columns
    (the rest may be garbage). Rows of up to `max_cols` (SparseKernelConfig.topk_max_cols) columns are held in
    registers (bisection on the bits); wider ones are read in tiles by a radix select. Both keep the tie rule.
    Non-fp32 scores take the reference `topk_block_indices`.
    """
    n = pooled.shape[-1]
    if pooled.dtype != torch.float32:
        if limits is not None:
            raise ValueError(f"topk_blocks_triton: limits need fp32 scores, got {pooled.dtype}")
        return topk_block_indices(pooled, total_blocks)
    lead = pooled.shape[:-1]
    out = torch.empty(*lead, total_blocks, dtype=torch.int32, device=pooled.device)
    x = pooled.reshape(-1, n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    R = x.shape[0]
    if R == 0:
        return out
    if limits is not None:
        if pooled.dim() != 4 or limits.shape != (pooled.shape[0], pooled.shape[2]):
            raise ValueError(f"topk_blocks_triton: limits {tuple(limits.shape)} must be [B, T] of pooled "
                             f"[B, H, T, n] {tuple(pooled.shape)}")
        H, T, lim = pooled.shape[1], pooled.shape[2], limits.to(torch.int32)
        slb, slt = lim.stride(0), lim.stride(1)
    else:
        H, T, lim, slb, slt = 1, 1, x, 0, 0
    KP = max(16, pow2(total_blocks))
    if n > max_cols:
        tile = 64 if interpreter_enabled() else 2048
        _topk_radix_kernel[(R,)](x, out, lim, n, H, T, x.stride(0), slb, slt, K=total_blocks, KP=KP, TILE=tile,
                                 HAS_LIM=limits is not None, num_warps=8)
        return out
    NC = max(16, pow2(n))
    warps = 4 if NC <= 2048 else (8 if NC <= 8192 else 16)
    _topk_blocks_kernel[(R,)](x, out, lim, n, H, T, x.stride(0), slb, slt, K=total_blocks, KP=KP, NC=NC,
                              HAS_LIM=limits is not None, num_warps=warps)
    return out
